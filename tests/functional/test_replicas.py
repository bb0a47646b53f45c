"""Two real sidecar processes (``python -m sidecar serve``) on one Redis and one upstream.

DESIGN.md: any client (another pod) replays a run and follows it live; ``POST .../cancel`` stops
the upstream request "wherever the run is produced (any replica)"; a run whose producing sidecar
died is ended with the ``producer_lost`` terminal once its lease expired, exactly once however many
readers notice.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.keys import Keys, RunId
from tests.conftest import Gate, RedisServer, Upstream
from tests.functional.helpers import (
    DONE,
    ClientView,
    LiveReader,
    eventually,
    meta,
    payloads,
    stop,
    stored,
    stored_count,
    token,
)
from tests.functional.replicas import Replica, Replicas

PATH = "/v1/agents/agent-1/messages/stream"

ReplicaFactory = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def replicas(
    upstream: Upstream,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> AsyncIterator[ReplicaFactory]:
    """``await replicas(a={flags}, b={flags})``: start them concurrently, wait until each is
    ready and subscribed to the cancel channel."""
    started = Replicas(http, upstream.url, tmp_path)

    async def subscribers() -> int:
        counts: Any = await redis_client.pubsub_numsub(Keys().cancel_channel)
        return int(counts[0][1])

    async def start(**configs: dict[str, Any]) -> list[Replica]:
        return await started.start(redis_server.url, subscribers, **configs)

    yield start
    await started.close()


def check_terminal_once(events: list[Any]) -> None:
    assert [e.data for e in events].count("[DONE]") == 1
    assert events[-1].data == "[DONE]"
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))


async def test_a_run_produced_on_a_is_followed_live_on_b(
    replicas: ReplicaFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), token("c"), gate,
                        token("d"), token("e"), stop("end_turn"), DONE])  # fmt: skip
    a, b = await replicas(a={}, b={})
    async with http.post(a.url + PATH, json={"messages": []}) as resp:
        live = LiveReader(resp)
        await live.until(3)
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])

        async def claimed() -> bool:
            # The live client gets events before A's claim is in Redis.
            async with http.get(b.run_url(run_id)) as status:
                return status.status == 200

        await eventually(claimed, what="A's claim of the run in Redis")
        async with http.get(b.run_url(run_id)) as status:
            assert (await status.json())["status"] == "running"
        async with (
            http.get(b.run_url(run_id, "/stream")) as on_b,
            http.post(f"{b.url}/v1/runs/{run_id}/stream", json={"starting_after": 2}) as letta_b,
        ):
            assert on_b.status == letta_b.status == 200
            follower, letta = LiveReader(on_b), LiveReader(letta_b)
            await follower.until(3)
            await letta.until(1)
            assert not gate.event.is_set()  # both caught up from history while A is held
            gate.open()
            body_b = await follower.rest()
            body_letta = await letta.rest()
        body_a = await live.rest()
    view = ClientView(200, dict(resp.headers), body_a)
    assert len(view.events) == 7
    check_terminal_once(view.events)
    assert body_b == body_a
    rows = await stored(redis_client, run_id)
    assert "".join(r["data"] for r in rows).encode() == body_a
    assert body_letta == "".join(r["data"] for r in rows[2:]).encode()
    async with http.get(b.run_url(run_id)) as status:
        final = await status.json()
    assert (final["status"], final["stop_reason"], final["last_seq"]) == (
        "completed",
        "end_turn",
        7,
    )
    assert final["forced_done"] is None


async def test_cancel_on_b_stops_the_run_produced_on_a(
    replicas: ReplicaFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), gate, token("never"), stop("end_turn"), DONE])
    a, b = await replicas(a={}, b={})
    async with http.post(a.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(2)
        await gate.reached.wait()
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        await stored_count(redis_client, run_id, 2)  # b knows the run from Redis
        async with http.get(b.run_url(run_id, "/stream")) as on_b:
            follower = LiveReader(on_b)
            await follower.until(2)
            async with http.post(b.run_url(run_id, "/cancel")) as cancel:
                assert cancel.status == 200, await cancel.text()
                answer = await cancel.json()
            body_b = await follower.rest()
        body_a = await live.rest()
    assert answer["run_id"] == run_id
    assert (answer["status"], answer["stop_reason"], answer["forced_done"]) == (
        "cancelled",
        "cancelled",
        "cancelled",
    )
    assert answer["last_seq"] == 4
    view = ClientView(200, dict(resp.headers), body_a)
    check_terminal_once(view.events)
    assert payloads(view.events) == [
        {"message_type": "assistant_message", "content": "a", "seq_id": 1, "run_id": run_id},
        {"message_type": "assistant_message", "content": "b", "seq_id": 2, "run_id": run_id},
        {"message_type": "stop_reason", "stop_reason": "cancelled", "seq_id": 3,
         "run_id": run_id},
        "[DONE]",
    ]  # fmt: skip
    rows = await stored(redis_client, run_id)
    assert "".join(r["data"] for r in rows).encode() == body_a == body_b
    assert [r["complete"] for r in rows] == ["false"] * 3 + ["true"]
    h = await meta(redis_client, run_id)
    assert (h["status"], h["stop_reason"], h["forced_done"]) == ("cancelled", "cancelled",
                                                                 "cancelled")  # fmt: skip
    # A closed its upstream request: the upstream's next write meets a closed connection.
    gate.open()
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert not upstream.finished.is_set()
    assert "cancelling run on request" in a.output()


async def test_producer_lost_when_a_is_killed_ends_the_run_once_for_readers_on_b(
    replicas: ReplicaFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), token("c"), gate, token("never"), DONE])
    lease = {"lease_seconds": 0.5}
    a, b = await replicas(a=lease, b={"heartbeat_seconds": 0.1, **lease})
    resp = await http.post(a.url + PATH, json={})
    live = LiveReader(resp)
    await live.until(3)
    run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    cursors = [0, 0, 1, 3, 3]
    async with asyncio.TaskGroup() as tg:
        opened = [
            tg.create_task(
                http.get(b.run_url(run_id, "/stream"), headers={"Last-Event-ID": str(c)})
            )
            for c in cursors
        ]
    readers = [LiveReader(task.result()) for task in opened]
    for reader, cursor in zip(readers, cursors, strict=True):
        assert reader.resp.status == 200
        if cursor < 3:
            await reader.until(3 - cursor)
    # The producer dies without a word: no terminal, no lease renewal.
    a.proc.kill()
    assert await asyncio.wait_for(a.proc.wait(), 5) == -9
    bodies = await asyncio.gather(*(reader.rest(timeout=10) for reader in readers))
    for reader in readers:
        reader.resp.release()
    with pytest.raises(aiohttp.ClientPayloadError):
        await live.rest()  # A's own client: its connection died with A
    resp.release()

    rows = await stored(redis_client, run_id)
    assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["complete"] for r in rows] == ["false"] * 5 + ["true"]
    assert [r["data"].count("[DONE]") for r in rows] == [0] * 5 + [1]
    # While they waited the readers got ": ping" heartbeats (comments: not events); apart from
    # them each got exactly the stored events after its cursor.
    assert all(b": ping\n" in body for body in bodies)
    for body, cursor in zip(bodies, cursors, strict=True):
        assert body.replace(b": ping\n", b"") == "".join(r["data"] for r in rows[cursor:]).encode()
    events = ClientView(200, {}, bodies[0]).events
    check_terminal_once(events)
    data = payloads(events)
    assert data[3] == {"message_type": "stop_reason", "stop_reason": "error", "seq_id": 4,
                       "run_id": run_id}  # fmt: skip
    assert events[4].event == "error"
    assert data[4]["error_type"] == "producer_lost"
    assert (data[4]["seq_id"], data[4]["run_id"]) == (5, run_id)
    h = await meta(redis_client, run_id)
    assert (h["status"], h["stop_reason"], h["forced_done"], h["last_seq"]) == (
        "failed",
        "error",
        "producer_lost",
        "6",
    )
    assert json.loads(h["error"])["error_type"] == "producer_lost"
    # One warning for the one forced terminal, however many readers noticed.
    assert b.output().count("forced producer_lost") == 1
    async with http.get(b.run_url(run_id, "/stream"), headers={"Last-Event-ID": "6"}) as after:
        assert after.status == 204
    gate.open()
    await asyncio.wait_for(upstream.disconnected.wait(), 5)


async def test_cancel_of_an_unknown_or_finished_run(
    replicas: ReplicaFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    a, b = await replicas(a={}, b={})
    async with http.post(a.url + PATH, json={}) as resp:
        await resp.read()
        run_id = resp.headers["X-Sidecar-Run-Id"]

    async def finished() -> bool:
        async with http.get(b.run_url(run_id)) as status:
            return status.status == 200 and (await status.json())["status"] == "completed"

    await eventually(finished, what="the run's final status in Redis")
    for replica in (a, b):
        async with http.post(replica.run_url("run-unknown", "/cancel")) as unknown:
            assert unknown.status == 404
            body = await unknown.json()
            assert body["error"]["type"] == "run_not_found"
        async with http.post(replica.run_url(run_id, "/cancel")) as done:
            assert done.status == 409
            body = await done.json()
            assert body["error"]["type"] == "run_finished"
            assert body["error"]["run_status"] == "completed"


async def test_a_producer_that_comes_back_after_producer_lost_is_fenced(
    replicas: ReplicaFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), gate, token("late"), stop("end_turn"), DONE])
    lease = {"lease_seconds": 0.5}
    a, b = await replicas(a=lease, b={"heartbeat_seconds": 0.1, **lease})
    async with http.post(a.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(2)
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])

        async def stored_both() -> bool:
            return len(await stored(redis_client, run_id)) == 2

        # The live client gets events before they are in Redis; wait until they are.
        await eventually(stored_both, what="A's first two events in Redis")
        # A freezes (a long GC pause, a stalled node): its lease runs out.
        a.proc.send_signal(signal.SIGSTOP)
        try:
            async with http.get(b.run_url(run_id, "/stream")) as on_b:
                body_b = await LiveReader(on_b).rest(timeout=10)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # A comes back and its upstream goes on: A's own client still gets the upstream's
        # events live, but nothing of it lands in the run, which has ended for everyone else.
        gate.open()
        body_a = await live.rest()
    rows = await stored(redis_client, run_id)
    assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4, 5]
    assert body_b.replace(b": ping\n", b"") == "".join(r["data"] for r in rows).encode()
    check_terminal_once(ClientView(200, {}, body_b.replace(b": ping\n", b"")).events)
    assert json.loads(rows[3]["data"].split("data: ", 1)[1])["error_type"] == "producer_lost"
    h = await meta(redis_client, run_id)
    assert (h["status"], h["forced_done"], h["last_seq"]) == ("failed", "producer_lost", "5")
    a_events = ClientView(200, {}, body_a).events
    assert [e.data for e in a_events][-1] == "[DONE]"
    assert [p.get("content") for p in payloads(a_events)[:3]] == ["a", "b", "late"]

    async def fenced() -> bool:
        async with http.get(a.admin_url + "/metrics") as m:
            text = await m.text()
        return 'sse_sidecar_writer_dropped_events_total{reason="fenced"} 3.0' in text

    await eventually(fenced, what="A to count its three late events as fenced")
