"""The store's reads under a burst (sidecar/store/batch.py) on a real Redis reached through a
slow link: many readers starting at once share a few pipelined round trips instead of queueing
for the pool's connections one command each (which refused most of them with StoreBusy, the
replay route's 503, once the wait passed the timeout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from sidecar.errors import StoreError
from sidecar.keys import Keys, RunId
from sidecar.store import RunStore
from tests.conftest import RedisServer
from tests.faults.forwarder import Forwarder
from tests.functional.helpers import eventually

KEYS = Keys()
RUNS = 200
EVENTS = 5
DELAY = 0.05  # each way: a round trip costs 100 ms


@pytest.fixture
async def slow_link(redis_server: RedisServer) -> AsyncIterator[Forwarder]:
    forwarder = Forwarder(redis_server.port)
    forwarder.delay = DELAY
    await forwarder.start()
    yield forwarder
    await forwarder.aclose()


async def write_runs(client: redis.asyncio.Redis, prefix: str) -> list[RunId]:
    """RUNS runs of EVENTS events each, in the layout the append script writes."""
    runs = [RunId(f"{prefix}-{i}") for i in range(RUNS)]
    async with client.pipeline(transaction=False) as pipe:
        for run_id in runs:
            for seq in range(1, EVENTS + 1):
                fields = {
                    "seq_id": seq,
                    "data": f"id: {seq}\ndata: {run_id} {seq}\n\n",
                    "timestamp": 1000 + seq,
                    "complete": "true" if seq == EVENTS else "false",
                }
                pipe.xadd(KEYS.stream(run_id), fields, id=f"{seq}-0")  # type: ignore[arg-type]
            pipe.hset(
                KEYS.meta(run_id),
                mapping={"status": "completed", "last_seq": EVENTS, "producer": "p"},
            )
        await pipe.execute()
    return runs


async def test_a_burst_of_reads_through_two_connections_all_succeed_in_few_round_trips(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis, slow_link: Forwarder
) -> None:
    runs = await write_runs(redis_client, "burst")
    # Two pooled connections, a 1 s wait for one: 600 reads one per connection would take
    # 30 s of round trips, and most would be refused.
    store = RunStore(slow_link.url, KEYS, max_connections=2, timeout=1.0)
    try:

        async def start_reader(run_id: RunId) -> tuple[str, int | None, bytes]:
            meta = await store.meta(run_id)
            assert meta is not None
            first = await store.first_seq(run_id)
            page = await store.page_after(run_id, 2, 100)
            assert (page.events, page.last, page.read) == (3, EVENTS, 3)
            return meta.status, first, page.data

        results = await asyncio.gather(*(start_reader(r) for r in runs))
    finally:
        await store.aclose()
    for run_id, (status, first, page) in zip(runs, results, strict=True):
        assert status == "completed"
        assert first == 1
        assert page == b"".join(f"id: {s}\ndata: {run_id} {s}\n\n".encode() for s in range(3, 6))
    # Every read went through the link in pipelined round trips on at most 2 connections.
    assert slow_link.accepted <= 2


async def test_an_unknown_run_and_an_error_reply_come_back_to_their_own_caller(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.set(KEYS.meta(RunId("not-a-hash")), "x")
    runs = await write_runs(redis_client, "mixed")
    store = RunStore(redis_server.url, KEYS, max_connections=2)
    try:
        calls = [store.meta(RunId("not-a-hash")), store.meta(RunId("nobody"))]
        calls += [store.meta(r) for r in runs[:20]]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await store.aclose()
    assert isinstance(results[0], StoreError)
    assert "WRONGTYPE" in str(results[0])
    assert results[1] is None
    assert all(getattr(m, "last_seq", None) == EVENTS for m in results[2:])


async def test_the_connections_a_burst_opened_are_closed_once_unused(
    redis_client: redis.asyncio.Redis, slow_link: Forwarder
) -> None:
    """A burst of commands at once opens as many pooled connections as it needs (up to
    max_connections); once they sit unused for pool_idle_seconds they are closed, but for the
    newest one, and the store works on as before (and opens more again when it needs them)."""
    runs = await write_runs(redis_client, "trim")
    store = RunStore(slow_link.url, KEYS, max_connections=6, timeout=2.0, pool_idle_seconds=0.4)
    store.start()
    try:
        # XLEN is not coalesced (batch.py): each of these holds a connection for a round trip.
        lengths = await asyncio.gather(*(store.length(r) for r in runs[:6]))
        assert lengths == [EVENTS] * 6
        assert slow_link.open_connections == 6

        async def trimmed() -> bool:
            return slow_link.open_connections == 1

        await eventually(trimmed, what="the unused connections closed")
        assert await store.length(runs[0]) == EVENTS
        assert slow_link.open_connections == 1
        assert await asyncio.gather(*(store.length(r) for r in runs[:3])) == [EVENTS] * 3
        assert slow_link.open_connections == 3
        await eventually(trimmed, what="the unused connections closed again")
    finally:
        await store.aclose()
    assert slow_link.accepted == 6 + 2
