"""The follower on the store's live tail (sidecar/follow.py, sidecar/store/tail.py), on a real
Redis, with both tails: the blocked ``XREAD`` of one Redis and the sharded pub/sub tail that a
cluster uses (here on one Redis, where the store can run it too); and the ``XREAD`` tail told of
every append as the writer tells it of the runs its process tees (``local``): those it serves
from the reports, and reads Redis only for readers behind them.

The guarantee under test: readers join at any moment, each with its own cursor (older or newer
than the tail's), while events keep coming; each gets every event after its cursor exactly once,
in order, and none is ever cut for a gap that is not there (a delivery read from a later cursor
than a reader's position is not offered to it).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from sidecar.follow import Follower, Subscription
from sidecar.keys import Keys, RunId
from sidecar.store import Entry, RunStore, TailMode
from sidecar.telemetry import Metrics
from tests.conftest import RedisServer
from tests.functional.helpers import eventually
from tests.functional.topology_helpers import Producer

EVENTS = 300
RUN = "joining"


@pytest.fixture(params=["xread", "pubsub", "local"])
async def follower(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[Follower, Producer, RunStore]]:
    mode: TailMode = "pubsub" if request.param == "pubsub" else "xread"
    store = RunStore(redis_server.url, Keys(), live_tail=mode)
    follower = Follower(store, Metrics())
    follower.start()
    client = redis.asyncio.Redis.from_url(redis_server.url)  # the producer's own
    await client.flushall()
    await client.script_load(Producer.script)
    producer = Producer(client, wake=mode == "pubsub")
    if request.param == "local":

        def report(run: str, first: int, last: int) -> None:
            entries = [Entry(s, f"{run}:{s}".encode(), 0, False) for s in range(first, last + 1)]
            follower.stored(RunId(run), entries)

        producer.on_acked = report
    try:
        yield follower, producer, store
    finally:
        await follower.close()
        await client.aclose()
        await store.aclose()


async def test_readers_joining_mid_stream_with_any_cursor_get_every_event_once(
    follower: tuple[Follower, Producer, RunStore],
) -> None:
    tail, producer, store = follower
    rng = random.Random(13)
    subs: list[Subscription] = []
    got: dict[int, list[Entry]] = {}

    async def produce() -> None:
        for _ in range(EVENTS):
            await producer.append([RUN], 1)
            await asyncio.sleep(0.001 * rng.random())

    async def join() -> None:
        while producer.acked.get(RUN, 0) < EVENTS:
            stored = producer.acked.get(RUN, 0)
            cursor = rng.randint(0, stored)
            subs.append(tail.subscribe(RunId(RUN), cursor, 1 << 30, stored=stored))
            await asyncio.sleep(0.003 * rng.random())

    async def drain(i: int) -> None:
        sub = subs[i]
        seen = got.setdefault(i, [])
        while not sub.broken and (not seen or seen[-1].seq < EVENTS):
            await sub.ready.wait()
            seen.extend(sub.take())

    await asyncio.gather(produce(), join())
    readers = [asyncio.create_task(drain(i)) for i in range(len(subs))]
    await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert len(subs) > 50
    for i, sub in enumerate(subs):
        assert not sub.broken, (i, sub.gap, sub.overflowed, sub.lost)
        start = got[i][0].seq
        assert [e.seq for e in got[i]] == list(range(start, EVENTS + 1)), i
        assert [e.data for e in got[i]] == [f"{RUN}:{s}".encode() for s in range(start, EVENTS + 1)]
    for sub in subs:
        tail.unsubscribe(sub)
    assert tail.followed == 0
    # Counted nowhere as a failure: nothing went wrong.
    assert store.health.up


async def test_a_delivery_read_from_a_later_cursor_is_not_offered_to_an_older_reader(
    follower: tuple[Follower, Producer, RunStore],
) -> None:
    """The follower's own guard, whatever the tail does: a reader at position 5 is not offered
    entries 11-12 of a read made from 10 (they would look like a gap and cut it)."""
    tail, producer, _ = follower
    await producer.append([RUN], 12)
    older = tail.subscribe(RunId(RUN), 5, 1 << 30, stored=12)
    newer = tail.subscribe(RunId(RUN), 10, 1 << 30, stored=10)
    # What a read from 10 delivers, as if it had been in flight when ``older`` joined.
    entries = [Entry(s, f"{RUN}:{s}".encode(), 0, False) for s in (11, 12)]
    tail.deliver(RunId(RUN), 10, entries)
    assert not older.broken
    assert not older.entries
    assert [e.seq for e in newer.take()] == [11, 12]

    # The tail itself reads from the older position: the older reader gets 6-12, once.
    async def caught_up() -> bool:
        return bool(older.entries) and older.entries[-1].seq == 12

    await eventually(caught_up, what="the older reader's catch-up")
    assert [e.seq for e in older.take()] == list(range(6, 13))
    assert not older.broken
