"""Redis faults under a live tee: DESIGN.md "The writer" (retries without loss or duplication)
and "Data flow" (the client gets every upstream byte as it arrives; it never waits on Redis).
"""

from __future__ import annotations

import aiohttp
import redis.asyncio

from sidecar.app import WRITER
from sidecar.keys import RunId
from tests.conftest import Gate, RedisServer, SidecarFactory, Step, Upstream
from tests.functional.helpers import (
    DONE,
    LiveReader,
    eventually,
    meta,
    payloads,
    stop,
    stored,
    stream,
    token,
)

P = "sse_sidecar_"


def contents(events: list[object]) -> list[object]:
    out: list[object] = []
    for p in events:
        out.append(p.get("content", p.get("stop_reason")) if isinstance(p, dict) else p)
    return out


async def test_redis_restart_mid_stream_loses_and_duplicates_nothing(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    restartable_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    g1, g2 = Gate(), Gate()
    steps: list[Step] = [token("t1"), token("t2"), g1, token("t3"), token("t4"), token("t5"), g2]
    upstream.sse("/v1/chat", [*steps, token("t6"), stop("end_turn"), DONE])
    sc = await make_sidecar(redis_url=restartable_redis.url, redis_timeout_seconds=0.5)
    client = redis.asyncio.Redis.from_url(restartable_redis.url)
    run_id = RunId("restart-1")
    try:
        async with http.post(sc.url + "/v1/chat", headers={"X-Run-Id": run_id}) as resp:
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(2)
            await g1.reached.wait()

            async def two_stored() -> bool:
                return (await meta(client, run_id)).get("last_seq") == "2"

            await eventually(two_stored, what="events 1-2 in Redis")
            await client.aclose()
            restartable_redis.stop()
            g1.open()
            # Redis is down, yet the client gets t3..t5 live; the writer holds them.
            events = await reader.until(5)
            assert contents(payloads(events)) == ["t1", "t2", "t3", "t4", "t5"]
            assert sc.app[WRITER].pending_events >= 3

            async def flush_failed() -> bool:
                return sc.metric(P + "redis_errors_total", operation="flush") > 0

            await eventually(flush_failed, timeout=15, what="a failed writer round trip")
            assert sc.metric(P + "flushes_total", outcome="error") > 0
            restartable_redis.start()
            g2.open()
            body = await reader.rest()
        await sc.flushed(timeout=15)
        client = redis.asyncio.Redis.from_url(restartable_redis.url)
        rows = await stored(client, run_id)
        assert [int(r["seq_id"]) for r in rows] == list(range(1, 9))
        assert [r["id"] for r in rows] == [f"{s}-0" for s in range(1, 9)]
        assert [r["complete"] for r in rows] == ["false"] * 7 + ["true"]
        assert "".join(r["data"] for r in rows).encode() == body
        assert len(reader.events) == 8
        h = await meta(client, run_id)
        assert h["status"] == "completed"
        assert h["last_seq"] == "8"
        assert "incomplete" not in h
        assert sc.metric(P + "redis_errors_total", operation="flush") > 0
        assert sc.metric(P + "flushes_total", outcome="error") > 0
        assert sc.metric(P + "writer_dropped_events_total", reason="overflow") == 0
    finally:
        await client.aclose()


async def test_redis_down_before_the_stream_still_streams_and_lands_later(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    restartable_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse("/v1/chat", [token("a"), token("b"), stop("end_turn"), DONE])
    sc = await make_sidecar(redis_url=restartable_redis.url, redis_timeout_seconds=0.5)
    restartable_redis.stop()
    view = await stream(http, sc.url + "/v1/chat", headers={"X-Run-Id": "down-1"})
    assert view.status == 200
    assert contents(payloads(view.events)) == ["a", "b", "end_turn", "[DONE]"]
    # The claim travels with the run's first write, which waits in the writer.
    assert sc.app[WRITER].pending_events == 4

    async def flush_failed() -> bool:
        return sc.metric(P + "redis_errors_total", operation="flush") > 0

    await eventually(flush_failed, what="a failed writer round trip")
    restartable_redis.start()
    await sc.flushed(timeout=15)
    client = redis.asyncio.Redis.from_url(restartable_redis.url)
    try:
        rows = await stored(client, view.run_id)
        assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4]
        assert "".join(r["data"] for r in rows).encode() == view.body
        h = await meta(client, view.run_id)
        assert h["status"] == "completed"
        assert h["stop_reason"] == "end_turn"
        assert h["route"] == "proxy"
        assert h["last_seq"] == "4"
        assert int(h["created_ms"]) > 0
    finally:
        await client.aclose()


async def test_script_flush_between_runs_and_mid_run(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse("/v1/one", [token("a"), stop("end_turn"), DONE])
    gate = Gate()
    upstream.sse("/v1/two", [token("b"), gate, token("c"), stop("end_turn"), DONE])
    sc = await make_sidecar()
    first = await stream(http, sc.url + "/v1/one")
    await sc.flushed()
    await redis_client.script_flush()
    second = await stream(http, sc.url + "/v1/one")
    await sc.flushed()
    for view in (first, second):
        rows = await stored(redis_client, view.run_id)
        assert [int(r["seq_id"]) for r in rows] == [1, 2, 3]
        assert "".join(r["data"] for r in rows).encode() == view.body
        assert (await meta(redis_client, view.run_id))["status"] == "completed"
    # Mid-run: the script vanishes between two writes of one run (the pipeline's NOSCRIPT path).
    errors_before = sc.metric(P + "flushes_total", outcome="error")
    async with http.post(sc.url + "/v1/two") as resp:
        reader = LiveReader(resp)
        await reader.until(1)
        await gate.reached.wait()
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])

        async def first_stored() -> bool:
            return (await meta(redis_client, run_id)).get("last_seq") == "1"

        await eventually(first_stored, what="event 1 in Redis")
        await redis_client.script_flush()
        gate.open()
        body = await reader.rest()
    await sc.flushed()
    rows = await stored(redis_client, run_id)
    assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4]
    assert "".join(r["data"] for r in rows).encode() == body
    assert (await meta(redis_client, run_id))["status"] == "completed"
    # One round trip found no script: the store loaded it and the writer sent it again.
    assert sc.metric(P + "flushes_total", outcome="error") == errors_before + 1
    assert sc.metric(P + "redis_errors_total", operation="append") == 0
