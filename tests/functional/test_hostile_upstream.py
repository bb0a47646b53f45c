"""An upstream that sends more than it should (issue 11, cases 1 and 7): decompression bombs,
one endless line, corrupt compressed data, and retry-only blocks.

Each run is checked with the tee's invariants (``check_run``): live bytes == stored bytes, one
``[DONE]`` and it is last, seqs 1..N, the meta, the metrics.
"""

from __future__ import annotations

import gzip
import json
import zlib

import aiohttp
import redis.asyncio

from tests.conftest import Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, ClientView, payloads, stop, stream, token
from tests.functional.test_tee_terminals import PATH, check_run

REJECTED = "sse_sidecar_upstream_rejected_total"
# One event of the bomb: 22 bytes of SSE, gzip squeezes a million of them into ~25 KB.
BOMB_EVENT = b'data: {"content":"x"}\n\n'


def gzip_steps(raw: bytes, chunk: int = 16 << 10) -> list[Step]:
    wire = gzip.compress(raw, compresslevel=9)
    return [wire[i : i + chunk] for i in range(0, len(wire), chunk)]


async def check_ended_by_upstream_error(
    sc: Sidecar, redis_client: redis.asyncio.Redis, view: ClientView
) -> None:
    """The run is stored whole, failed with the sidecar's forced upstream_error terminal."""
    await check_run(
        sc,
        redis_client,
        view.run_id,
        status="failed",
        stop_reason="error",
        forced_done="upstream_error",
        live=view.body,
    )


async def test_a_gzip_bomb_ends_its_run_at_max_decompressed_bytes(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    cap = 1 << 20
    sc = await make_sidecar(max_decompressed_bytes=cap, max_stream_events=1_000_000)
    steps = gzip_steps(BOMB_EVENT * 1_000_000 + DONE)  # 23 MB in about 23 KB
    assert sum(len(s) for s in steps if isinstance(s, bytes)) < 64 << 10
    upstream.sse(PATH, steps, headers={"Content-Encoding": "gzip"})
    view = await stream(http, sc.url + PATH, json={})
    assert view.status == 200
    events = view.events
    whole = cap // len(BOMB_EVENT)  # the events that fit in the cap, the last one cut short
    assert len(events) == whole + 3
    run_id = view.run_id
    expected = [f'{{"content":"x","seq_id":{i},"run_id":"{run_id}"}}' for i in range(1, whole + 1)]
    assert [e.data for e in events[:whole]] == expected
    stop_reason, error, done = payloads(events[whole:])
    assert stop_reason["stop_reason"] == "error"
    assert error["error_type"] == "upstream_error"
    assert error["detail"] == (
        f"the upstream's compressed body decodes to more than max_decompressed_bytes ({cap} bytes)"
    )
    assert done == "[DONE]"
    await check_ended_by_upstream_error(sc, redis_client, view)
    assert sc.metric(REJECTED, reason="decompressed_bytes") == 1


async def test_one_endless_line_ends_its_run_at_max_event_bytes(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    steps = gzip_steps(token("before") + b"data: " + b"a" * (8 << 20))  # no line end, ever
    upstream.sse(PATH, steps, headers={"Content-Encoding": "gzip"})
    view = await stream(http, sc.url + PATH, json={})
    contents = payloads(view.events)
    assert contents[0]["content"] == "before"
    assert contents[2]["error_type"] == "upstream_error"
    assert "max_event_bytes (1048576 bytes)" in contents[2]["detail"]
    await check_ended_by_upstream_error(sc, redis_client, view)
    assert sc.metric(REJECTED, reason="event_bytes") == 1
    assert sc.metric(REJECTED, reason="decompressed_bytes") == 0


async def test_corrupt_compressed_data_keeps_the_events_before_it(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    z = zlib.compressobj()
    good = z.compress(token("a") + token("b")) + z.flush(zlib.Z_SYNC_FLUSH)
    upstream.sse(PATH, [good, b"\xff\xfe not deflate"], headers={"Content-Encoding": "deflate"})
    view = await stream(http, sc.url + PATH, json={})
    contents = payloads(view.events)
    assert [c.get("content") for c in contents[:2]] == ["a", "b"]
    assert contents[3]["detail"].startswith("cannot decode the upstream's deflate body: ")
    await check_ended_by_upstream_error(sc, redis_client, view)
    assert sc.metric(REJECTED, reason="corrupt_encoding") == 1


async def test_a_retry_only_block_is_stored_and_replayed_as_the_live_client_got_it(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    upstream.sse(PATH, [b"retry: 3000\n\n", token("a"), b"retry: 10\n\n", stop("end_turn"), DONE])
    view = await stream(http, sc.url + PATH, json={})
    r = view.run_id
    first = json.dumps(
        {"message_type": "assistant_message", "content": "a", "seq_id": 1, "run_id": r},
        separators=(",", ":"),
    )
    second = json.dumps(
        {"message_type": "stop_reason", "stop_reason": "end_turn", "seq_id": 2, "run_id": r},
        separators=(",", ":"),
    )
    # Each retry block travels with the event after it: no id of its own, seqs unbroken.
    assert view.body == (
        b"retry: 3000\n\n"
        + f"id: 1\ndata: {first}\n\n".encode()
        + b"retry: 10\n\n"
        + f"id: 2\ndata: {second}\n\n".encode()
        + b"id: 3\ndata: [DONE]\n\n"
    )
    rows = await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )
    assert rows[0]["data"].startswith("retry: 3000\n\nid: 1\n")
    replay = await stream(http, f"{sc.url}/sidecar/v1/runs/{r}/stream", method="GET")
    assert replay.body == view.body
