"""A live client that stops reading: it is cut after a bounded buffer or a write timeout, while
the tee stores its run to the end and the cancel API still answers (issue 11, cases 2 and 3)."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio

from sidecar.api import CANCEL_WAIT_SECONDS
from sidecar.keys import RunId
from tests.conftest import Gate, Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    eventually,
    meta,
    raw_connect,
    raw_request,
    read_to_end,
    stop,
    stored,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"
# Events of about 2 KB: 2,000 of them are 4 MB, far more than the socket buffers between a
# client that stopped reading and the sidecar hold.
BIG = "x" * 2000
N = 2000
CUT = "sse_sidecar_live_clients_cut_total"


async def stalled_client(
    sc: Sidecar, run_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Starts a run with a client whose receive buffer is tiny and which never reads."""
    reader, writer = await raw_connect(sc.settings.port, rcvbuf=4096)
    writer.write(
        raw_request(
            "POST",
            PATH,
            [("X-Run-Id", run_id), ("Content-Type", "application/json")],
            b"{}",
        )
    )
    await writer.drain()
    return reader, writer


async def stored_up_to(client: redis.asyncio.Redis, run_id: str, seq: int) -> None:
    async def reached() -> bool:
        return int((await meta(client, RunId(run_id))).get("last_seq", 0)) >= seq

    await eventually(reached, timeout=20, what=f"run {run_id} stored up to seq {seq}")


async def test_a_client_that_stops_reading_is_cut_at_its_buffer_and_the_run_is_stored_whole(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(live_buffer_bytes=256 << 10, live_write_timeout_seconds=60)
    upstream.sse(PATH, [*(token(BIG) for _ in range(N)), stop("end_turn"), DONE])
    reader, writer = await stalled_client(sc, "stalled")
    try:
        await stored_up_to(redis_client, "stalled", N + 2)
        await sc.flushed()
        m = await meta(redis_client, RunId("stalled"))
        assert (m["status"], m["stop_reason"], m["forced_done"]) == ("completed", "end_turn", "")
        rows = await stored(redis_client, RunId("stalled"))
        assert [r["seq_id"] for r in rows] == [str(i) for i in range(1, N + 3)]
        assert sc.metric(CUT, reason="buffer") == 1
        assert sc.metric(CUT, reason="write_timeout") == 0
        # Cut, not left: the run was not cancelled and no departure was counted.
        assert sc.metric("sse_sidecar_client_disconnects_total") == 0
        # The connection was reset: never the chunked terminator a finished response ends with.
        body, reset = await read_to_end(reader)
        assert reset
        assert not body.endswith(b"0\r\n\r\n")
        assert b"data: [DONE]" not in body
    finally:
        writer.close()


async def test_a_client_that_accepts_nothing_is_cut_after_the_write_timeout(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(live_buffer_bytes=64 << 20, live_write_timeout_seconds=0.5)
    gate = Gate()
    upstream.sse(PATH, [*(token(BIG) for _ in range(N)), gate, stop("end_turn"), DONE])
    reader, writer = await stalled_client(sc, "frozen")
    try:
        # The tee stores every event while the client holds nothing back...
        await stored_up_to(redis_client, "frozen", N)

        async def cut() -> bool:
            return sc.metric(CUT, reason="write_timeout") == 1

        # ...and the client is cut once one write has waited for the timeout.
        await eventually(cut, timeout=10, what="the write timeout cut")
        gate.open()
        await sc.flushed()
        m = await meta(redis_client, RunId("frozen"))
        assert (m["status"], m["last_seq"]) == ("completed", str(N + 2))
        assert sc.metric(CUT, reason="buffer") == 0
        _, reset = await read_to_end(reader)
        assert reset
    finally:
        gate.open()
        writer.close()


async def test_cancel_answers_while_the_runs_client_has_filled_its_socket_buffers(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # Neither bound cuts this client during the test: only the tee's independence is at work.
    sc = await make_sidecar(live_buffer_bytes=64 << 20, live_write_timeout_seconds=60)
    gate = Gate()
    upstream.sse(PATH, [*(token(BIG) for _ in range(N)), gate, token("never"), DONE])
    _, writer = await stalled_client(sc, "cancel-me")
    try:
        await stored_up_to(redis_client, "cancel-me", N)
        async with asyncio.timeout(CANCEL_WAIT_SECONDS + 5):
            async with http.post(sc.url + "/sidecar/v1/runs/cancel-me/cancel") as resp:
                # 200 (not 202): the terminal landed within the documented wait.
                assert resp.status == 200
                body = await resp.json()
        assert body["status"] == "cancelled"
        assert body["forced_done"] == "cancelled"
        assert body["last_seq"] == N + 2  # stop_reason cancelled, [DONE]
        rows = await stored(redis_client, RunId("cancel-me"))
        assert rows[-1]["data"] == f"id: {N + 2}\ndata: [DONE]\n\n"
        assert rows[-1]["complete"] == "true"
        assert sc.metric(CUT, reason="buffer") + sc.metric(CUT, reason="write_timeout") == 0
    finally:
        gate.open()
        writer.close()
