"""The group-commit writer (sidecar/writer.py, sidecar/append.lua) against a real Redis.

DESIGN.md, "Redis layout" and "The writer": group commit without a timer, idempotent atomic
appends keyed by seq, TTL refreshed on write, a counted length cap, a bounded buffer whose
overflow is reported in the meta, and producer leases that refuse or fence a second producer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.errors import RunConflict
from sidecar.keys import Keys, RunId
from sidecar.store import RunStore
from sidecar.store.runstore import APPEND_SCRIPT, APPEND_SHA
from sidecar.telemetry import Metrics
from sidecar.writer import RunStream, Writer
from tests.conftest import Gate, RedisServer, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    LiveReader,
    eventually,
    meta,
    stop,
    stored,
    token,
)

KEYS = Keys()
P = "sse_sidecar_"


def ev(seq: int, size: int | None = None) -> bytes:
    """One encoded event as the tee stores it; ``size`` pads it to exactly that many bytes."""
    raw = f"id: {seq}\ndata: event {seq}\n\n".encode()
    if size is None:
        return raw
    head = f"id: {seq}\ndata: ".encode()
    return head + b"x" * (size - len(head) - 2) + b"\n\n"


def sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(P + name, labels)
    return 0.0 if value is None else value


def seqs(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["seq_id"]) for r in rows]


async def redis_ms(client: redis.asyncio.Redis) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def run_script(client: redis.asyncio.Redis, run_id: RunId, *args: Any) -> list[Any]:
    """Call append.lua by sha, exactly as the writer does (KEYS = stream, meta)."""
    reply: Any = await client.execute_command(  # type: ignore[no-untyped-call]
        "EVALSHA", APPEND_SHA, 2, KEYS.stream(run_id), KEYS.meta(run_id), *args
    )
    return [int(x) if isinstance(x, int) else x for x in reply]


WriterFactory = Callable[..., tuple[Writer, Metrics]]


@pytest.fixture
async def writers(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> AsyncIterator[WriterFactory]:
    """Started writers, each on its own store and Metrics, closed after the test."""
    made: list[tuple[Writer, RunStore]] = []

    def make(url: str | None = None, timeout: float = 2.0, **kwargs: Any) -> tuple[Writer, Metrics]:
        m = Metrics()
        store = RunStore(url or redis_server.url, KEYS, timeout=timeout)
        w = Writer(store, m, **kwargs)
        w.start()
        made.append((w, store))
        return w, m

    yield make
    for w, store in made:
        await w.close(1.0)
        await store.aclose()


async def opened(w: Writer, run_id: str, producer: str = "p1") -> RunStream:
    """A run opened and claimed (its claim is in Redis)."""
    run = w.open(RunId(run_id), producer, {"status": "running", "created_ms": "1"})
    assert await w.flush(5)
    assert run.claim.result() is True
    return run


# -- group commit ------------------------------------------------------------------------------


async def test_first_event_of_an_idle_writer_goes_out_alone(writers: WriterFactory) -> None:
    w, m = writers()
    run = await opened(w, "gc-1")  # one round trip: the claim
    assert w.append(run, 1, ev(1))
    assert await w.flush(5)
    assert sample(m, "flush_batch_events_count") == 2
    assert sample(m, "flush_batch_events_sum") == 1
    assert sample(m, "flushes_total", outcome="ok") == 2
    assert w.pending_events == 0
    assert w.pending_bytes == 0


async def test_events_appended_during_a_round_trip_go_in_the_next_one(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, m = writers()
    run = await opened(w, "gc-2")
    assert w.append(run, 1, ev(1))
    # One turn of the loop: the writer task builds its batch (event 1) and waits on the socket.
    await asyncio.sleep(0)
    assert sample(m, "flush_batch_events_count") == 1  # the claim's; event 1's is in flight
    for seq in range(2, 502):
        assert w.append(run, seq, ev(seq))
    assert await w.flush(5)
    # Three round trips: the claim (no event), the lone first event, then 500 together.
    assert sample(m, "flushes_total", outcome="ok") == 3
    assert sample(m, "flushes_total", outcome="error") == 0
    assert sample(m, "flush_batch_events_count") == 3
    assert sample(m, "flush_batch_events_sum") == 501
    assert sample(m, "flush_batch_events_bucket", le="1.0") == 2
    assert sample(m, "flush_batch_events_bucket", le="256.0") == 2
    assert sample(m, "flush_batch_events_bucket", le="512.0") == 3
    rows = await stored(redis_client, run.run_id)
    assert seqs(rows) == list(range(1, 502))
    assert [r["data"].encode() for r in rows] == [ev(s) for s in range(1, 502)]


@pytest.mark.parametrize(("cap", "bucket"), [(10, "16.0"), (8, "8.0")])
async def test_flush_max_events_caps_a_round_trip(
    writers: WriterFactory, redis_client: redis.asyncio.Redis, cap: int, bucket: str
) -> None:
    w, m = writers(flush_max_events=cap)
    run = await opened(w, f"gc-cap-{cap}")
    claim_rounds = sample(m, "flush_batch_events_count")
    for seq in range(1, 36):
        assert w.append(run, seq, ev(seq))
    assert await w.flush(5)
    rounds = sample(m, "flush_batch_events_count")
    assert rounds >= -(-35 // cap)  # ceil(35 / cap)
    assert sample(m, "flush_batch_events_sum") == 35
    # Every round trip is in the bucket of the cap (for cap 8 that bucket is exactly <= 8).
    assert sample(m, "flush_batch_events_bucket", le=bucket) == rounds
    assert sample(m, "flushes_total", outcome="ok") == rounds
    assert claim_rounds == 1
    assert seqs(await stored(redis_client, run.run_id)) == list(range(1, 36))


async def test_many_runs_share_one_round_trip(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, m = writers()
    runs = [w.open(RunId(f"many-{i}"), "p1", {"status": "running"}) for i in range(50)]
    for seq in range(1, 11):
        for run in runs:
            assert w.append(run, seq, f"data: {run.run_id} {seq}\n\n".encode())
    assert await w.flush(5)
    # The 50 claims and the 500 events: one round trip.
    assert sample(m, "flush_batch_events_count") == 1
    assert sample(m, "flush_batch_events_sum") == 500
    for run in runs:
        rows = await stored(redis_client, run.run_id)
        assert seqs(rows) == list(range(1, 11))
        assert [r["data"] for r in rows] == [f"data: {run.run_id} {s}\n\n" for s in range(1, 11)]
        assert [r["id"] for r in rows] == [f"{s}-0" for s in range(1, 11)]
        assert (await meta(redis_client, run.run_id))["last_seq"] == "10"


class FeedingStore(RunStore):
    """A store that records which runs each round trip carries events of, and calls ``feed``
    as each one goes out: streams that keep producing while the writer is behind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.carried: list[set[RunId]] = []
        self.feed: Callable[[], None] = lambda: None

    async def append(self, ops: Any, **kwargs: Any) -> Any:
        if carried := {op.run_id for op in ops if op.events}:
            self.carried.append(carried)
            self.feed()
        return await super().append(ops, **kwargs)


async def test_a_writer_behind_serves_every_run_in_turn(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """20 runs that each get a new event with every round trip, 4 events a round trip (the
    writer falls further behind with each): every run is served in turn, within 20 round trips.
    Before, the runs first in line took every round trip's budget and the others stored nothing
    while those kept producing (at 1,000 streams, the newest runs' first events were stored 4 s
    late)."""
    store = FeedingStore(redis_server.url, KEYS)
    w = Writer(store, Metrics(), flush_max_events=4)
    w.start()
    try:
        runs = [await opened(w, f"turn-{i}") for i in range(20)]
        produced = dict.fromkeys(runs, 0)
        feeding = 60  # round trips during which the runs keep producing

        def feed() -> None:
            if len(store.carried) > feeding:
                return
            for run in runs:
                produced[run] += 1
                assert w.append(run, produced[run], ev(produced[run]))

        store.feed = feed
        feed()
        assert await w.flush(10)
        # Served in turn: the 20th run in round trip 15 (before: the 7th in round trip 90, once
        # the others had stopped producing).
        served = set().union(*store.carried[:20])
        assert served == {run.run_id for run in runs}
        for run in runs:
            assert seqs(await stored(redis_client, run.run_id)) == list(range(1, produced[run] + 1))
    finally:
        await w.close(1.0)
        await store.aclose()


class HeldStore(RunStore):
    """A store whose round trips carrying run ``held`` wait for ``release`` (Redis itself is
    real): the writer's first lane, stuck in flight."""

    held = RunId("held")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def append(self, ops: Any, **kwargs: Any) -> Any:
        if any(op.run_id == self.held and op.events for op in ops):
            self.holding.set()
            await self.release.wait()
        return await super().append(ops, **kwargs)


async def test_a_backlog_of_other_runs_goes_out_while_a_round_trip_is_in_flight(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """While the first lane's round trip is in flight, a backlog of other runs' events goes in
    a second one (it does not wait 45 ms behind it, as at 1,000 streams); the run in flight
    stays in one round trip at a time, so its events land in order."""
    store = HeldStore(redis_server.url, KEYS)
    m = Metrics()
    w = Writer(store, m, flush_max_events=64)  # the second lane starts at 16 unsent events
    w.start()
    try:
        held = await opened(w, store.held)
        others = [w.open(RunId(f"other-{i}"), "p1", {"status": "running"}) for i in range(40)]
        assert await w.flush(5)
        assert w.append(held, 1, ev(1))
        await store.holding.wait()
        for seq in range(2, 30):  # behind the round trip in flight: not in the second lane
            assert w.append(held, seq, ev(seq))
        for run in others:
            assert w.append(run, 1, ev(1))

        async def others_stored() -> bool:
            return all([len(await stored(redis_client, r.run_id)) == 1 for r in others])

        await eventually(others_stored, what="the other runs' events, past the held round trip")
        assert await stored(redis_client, store.held) == []
        assert w.pending_events == 29
        store.release.set()
        assert await w.flush(5)
        assert seqs(await stored(redis_client, store.held)) == list(range(1, 30))
        assert sample(m, "flushes_total", outcome="error") == 0
        assert sample(m, "flush_batch_events_sum") == 29 + 40
    finally:
        await w.close(1.0)
        await store.aclose()


class BrokenSecondLane(Writer):
    async def _overlap_loop(self) -> None:
        raise RuntimeError("second lane broke")


async def test_a_failed_second_lane_fails_the_writer_which_is_restarted(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    store = RunStore(redis_server.url, KEYS)
    m = Metrics()
    w = BrokenSecondLane(store, m)
    w.start()
    try:
        run = w.open(RunId("lanes-1"), "p1", {"status": "running"})
        assert w.append(run, 1, ev(1))

        async def crashed() -> bool:
            return sample(m, "background_crashes_total", task="sse-writer") >= 1

        await eventually(crashed, what="the writer's crash counted")
        # The supervisor restarts it (and it fails again, each time its second lane fails);
        # what it had taken before a failure was seen is written all the same.
        assert await w.flush(5)
        assert seqs(await stored(redis_client, run.run_id)) == [1]
    finally:
        await w.close(1.0)
        await store.aclose()


# -- idempotence ---------------------------------------------------------------------------


def quad(seq: int, complete: bool = False) -> list[Any]:
    return [seq, ev(seq), 1700000000000 + seq, "true" if complete else "false"]


async def test_append_script_retried_with_the_same_batch_stores_each_seq_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    await redis_client.script_load(APPEND_SCRIPT)
    run_id = RunId("idem-script")
    # producer, claim, lease_ms, ttl_ms, maxlen, known_last, allow_gap, wake, nmeta, meta
    # pairs, event quads
    head = ["prod-a", "1", "30000", "60000", "100000", 0, "0", "0", 1, "status", "running"]
    batch = [*head, *quad(1), *quad(2)]
    # {0, added, trimmed, last_seq, rebuilt, replaced, rolled_back}
    assert await run_script(redis_client, run_id, *batch) == [0, 2, 0, 2, 0, 0, 0]
    # The reply was "lost": the same batch again (the writer would still send claim=1).
    assert await run_script(redis_client, run_id, *batch) == [0, 0, 0, 2, 0, 0, 0]
    # A later retry that overlaps: only the new seq is added.
    again = ["prod-a", "0", "30000", "60000", "100000", 2, "0", "0", 0, *quad(2), *quad(3)]
    assert await run_script(redis_client, run_id, *again) == [0, 1, 0, 3, 0, 0, 0]
    rows = await stored(redis_client, run_id)
    assert seqs(rows) == [1, 2, 3]
    assert [r["id"] for r in rows] == ["1-0", "2-0", "3-0"]
    # A gap (seq 5 after last_seq 3) is refused with the stored last_seq, and nothing of the
    # batch is written, not even the events before the gap.
    gap = ["prod-a", "0", "30000", "60000", "100000", 3, "0", "0", 0, *quad(4), *quad(6)]
    assert await run_script(redis_client, run_id, *gap) == [-3, 3]
    assert seqs(await stored(redis_client, run_id)) == [1, 2, 3]
    assert (await meta(redis_client, run_id))["last_seq"] == "3"
    # The same batch with allow_gap: the hole is recorded as lost, and retrying it changes
    # nothing (the hole is recorded once).
    hole = ["prod-a", "0", "30000", "60000", "100000", 3, "1", "0", 0, *quad(4), *quad(6)]
    assert await run_script(redis_client, run_id, *hole) == [0, 2, 0, 6, 0, 0, 0]
    assert await run_script(redis_client, run_id, *hole) == [0, 0, 0, 6, 0, 0, 0]
    assert seqs(await stored(redis_client, run_id)) == [1, 2, 3, 4, 6]
    h = await meta(redis_client, run_id)
    assert (h["last_seq"], h["lost_ranges"], h["lost_events"]) == ("6", "5-5", "1")


async def test_a_second_writer_of_the_same_producer_replaying_seqs_does_not_duplicate(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    first, _ = writers()
    run = await opened(first, "idem-writer", producer="prod-x")
    for seq in (1, 2, 3):
        assert first.append(run, seq, ev(seq))
    assert await first.flush(5)
    # The same producer again (as after a lost reply), replaying 1..3 and going on to 5.
    second, second_m = writers()
    again = second.open(run.run_id, "prod-x", {})
    for seq in range(1, 6):
        assert second.append(again, seq, ev(seq), complete=seq == 5)
    assert await second.flush(5)
    rows = await stored(redis_client, run.run_id)
    assert seqs(rows) == [1, 2, 3, 4, 5]
    assert [r["complete"] for r in rows] == ["false"] * 4 + ["true"]
    assert sample(second_m, "writer_dropped_events_total", reason="gap") == 0
    assert (await meta(redis_client, run.run_id))["last_seq"] == "5"


async def test_a_gap_in_seqs_is_refused_and_the_run_is_fenced(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    first, _ = writers()
    run = await opened(first, "idem-gap", producer="prod-g")
    for seq in (1, 2, 3):
        assert first.append(run, seq, ev(seq))
    assert await first.flush(5)
    second, m = writers()
    again = second.open(run.run_id, "prod-g", {})
    assert second.append(again, 5, ev(5))  # queued: the writer cannot know yet
    assert await second.flush(5)
    assert sample(m, "writer_dropped_events_total", reason="gap") == 1
    assert not second.append(again, 6, ev(6))
    assert sample(m, "writer_dropped_events_total", reason="gap") == 2
    assert seqs(await stored(redis_client, run.run_id)) == [1, 2, 3]
    assert (await meta(redis_client, run.run_id))["last_seq"] == "3"


async def test_confirmed_events_redis_lost_are_recorded_and_the_run_is_stored_on(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    """Redis comes back holding the run without its last confirmed events (a failover to a
    replica that lagged): not a gap to refuse, a loss to record (tests/faults/test_failover.py
    is the same with a real replica)."""
    w, m = writers()
    run = await opened(w, "rollback-1", producer="prod-r")
    for seq in range(1, 6):
        assert w.append(run, seq, ev(seq))
    assert await w.flush(5)
    await redis_client.xdel(KEYS.stream(run.run_id), "4-0", "5-0")
    await redis_client.hset(KEYS.meta(run.run_id), "last_seq", "3")
    assert w.append(run, 6, ev(6))
    assert w.append(run, 7, ev(7), complete=True, meta={"status": "completed"})
    assert await w.flush(5)
    assert seqs(await stored(redis_client, run.run_id)) == [1, 2, 3, 6, 7]
    h = await meta(redis_client, run.run_id)
    assert (h["incomplete"], h["history_lost_ranges"]) == ("history_lost", "4-5")
    assert (h["last_seq"], h["status"], h["producer"]) == ("7", "completed", "prod-r")
    assert sample(m, "writer_dropped_events_total", reason="history_lost") == 2
    assert sample(m, "writer_dropped_events_total", reason="gap") == 0


# -- TTL and length cap ----------------------------------------------------------------------


async def test_both_keys_get_the_ttl_and_every_write_refreshes_it(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, _ = writers(ttl_seconds=100)
    run = await opened(w, "ttl-1")
    both = (KEYS.stream(run.run_id), KEYS.meta(run.run_id))
    assert 99000 < await redis_client.pttl(both[1]) <= 100000
    assert w.append(run, 1, ev(1))
    assert await w.flush(5)
    for key in both:
        assert 99000 < await redis_client.pttl(key) <= 100000
        await redis_client.pexpire(key, 5000)
    assert w.append(run, 2, ev(2))  # an event refreshes both keys
    assert await w.flush(5)
    for key in both:
        assert 99000 < await redis_client.pttl(key) <= 100000
        await redis_client.pexpire(key, 5000)
    w.renew([run])  # and so does a lease renewal
    assert await w.flush(5)
    for key in both:
        assert 99000 < await redis_client.pttl(key) <= 100000


async def test_length_cap_trims_the_oldest_events_and_counts_them(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, m = writers(max_stream_events=10)
    run = await opened(w, "cap-1")
    assert w.append(run, 1, ev(1))
    await asyncio.sleep(0)  # let the first event go alone: trimming then spans round trips
    for seq in range(2, 26):
        assert w.append(run, seq, ev(seq), complete=seq == 25)
    assert await w.flush(5)
    assert await redis_client.xlen(KEYS.stream(run.run_id)) == 10
    rows = await stored(redis_client, run.run_id)
    assert rows[0]["id"] == "16-0"
    assert seqs(rows) == list(range(16, 26))
    h = await meta(redis_client, run.run_id)
    assert h["trimmed_events"] == "15"
    assert h["last_seq"] == "25"
    assert sample(m, "stream_trimmed_events_total") == 15


# -- the bound on unwritten bytes ------------------------------------------------------------


async def test_overflow_drops_what_does_not_fit_and_records_the_hole(
    writers: WriterFactory, restartable_redis: RedisServer
) -> None:
    client = redis.asyncio.Redis.from_url(restartable_redis.url)
    try:
        w, m = writers(restartable_redis.url, timeout=0.5, max_bytes=2000)
        run = await opened(w, "overflow-1")
        restartable_redis.stop()
        for seq in range(1, 21):  # 20 events of 100 bytes: exactly the bound
            assert w.append(run, seq, ev(seq, 100))
        assert w.pending_bytes == 2000
        for seq in range(21, 25):
            assert not w.append(run, seq, ev(seq, 100))
        # The terminal is never dropped: every stored run ends (over the bound by one event).
        final = {"status": "completed", "stop_reason": "end_turn", "finished_ms": "2"}
        assert w.append(run, 25, ev(25, 100), complete=True, meta=final)
        assert sample(m, "writer_dropped_events_total", reason="overflow") == 4
        assert w.pending_events == 21
        assert not await w.flush(0.2)  # nothing can be written while Redis is down
        restartable_redis.start()
        assert await w.flush(10)
        rows = await stored(client, run.run_id)
        assert seqs(rows) == [*range(1, 21), 25]
        assert [r["data"].encode() for r in rows] == [ev(s, 100) for s in [*range(1, 21), 25]]
        assert [r["complete"] for r in rows] == ["false"] * 20 + ["true"]
        h = await meta(client, run.run_id)
        assert (h["incomplete"], h["lost_ranges"], h["lost_events"]) == ("overflow", "21-24", "4")
        assert (h["last_seq"], h["status"], h["stop_reason"]) == ("25", "completed", "end_turn")
        assert (h["created_ms"], h["producer"]) == ("1", "p1")
    finally:
        await client.aclose()


async def test_a_run_that_overflowed_is_stored_again_once_there_is_room(
    writers: WriterFactory, restartable_redis: RedisServer
) -> None:
    client = redis.asyncio.Redis.from_url(restartable_redis.url)
    try:
        w, m = writers(restartable_redis.url, timeout=0.5, max_bytes=1000)
        run = await opened(w, "overflow-2")
        restartable_redis.stop()
        for seq in range(1, 11):
            assert w.append(run, seq, ev(seq, 100))
        for seq in range(11, 16):  # no room: dropped
            assert not w.append(run, seq, ev(seq, 100))
        restartable_redis.start()
        assert await w.flush(10)
        # Room again: stored again from the next event on, after a recorded hole.
        for seq in range(16, 21):
            assert w.append(run, seq, ev(seq, 100), complete=seq == 20)
        assert await w.flush(10)
        rows = await stored(client, run.run_id)
        assert seqs(rows) == [*range(1, 11), *range(16, 21)]
        h = await meta(client, run.run_id)
        assert (h["incomplete"], h["lost_ranges"], h["lost_events"]) == ("overflow", "11-15", "5")
        assert sample(m, "writer_dropped_events_total", reason="overflow") == 5
    finally:
        await client.aclose()


# -- producers, leases, fencing --------------------------------------------------------------


async def test_open_of_a_run_with_a_live_lease_of_another_producer_is_refused(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    a, _ = writers(lease_seconds=30)
    run = await opened(a, "conflict-1", producer="prod-a")
    assert a.append(run, 1, ev(1))
    assert await a.flush(5)
    b, bm = writers()
    refused = b.open(RunId("conflict-1"), "prod-b", {"status": "running"})
    # Refused in the writer's round trip: the claim says who holds the run, and the run is
    # fenced (nothing of it is ever written).
    refusal = await refused.claim
    assert isinstance(refusal, RunConflict)
    assert (refusal.producer, refusal.run_id) == ("prod-a", "conflict-1")
    assert refused.fenced == "conflict"
    assert not b.append(refused, 1, ev(1))
    assert sample(bm, "writer_dropped_events_total", reason="conflict") == 1
    h = await meta(redis_client, run.run_id)
    assert h["producer"] == "prod-a"
    assert h["status"] == "running"
    assert seqs(await stored(redis_client, run.run_id)) == [1]


async def test_an_expired_lease_lets_a_new_producer_claim_and_fences_the_old_one(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    old, m = writers(lease_seconds=0.1)
    run = await opened(old, "fence-1", producer="prod-old")
    for seq in (1, 2):
        assert old.append(run, seq, ev(seq))
    assert await old.flush(5)
    lease_until = int((await meta(redis_client, run.run_id))["lease_until_ms"])

    async def expired() -> bool:
        return await redis_ms(redis_client) > lease_until

    await eventually(expired, what="the old producer's lease to expire")
    new, _ = writers()
    taken = await opened(new, "fence-1", producer="prod-new")  # not refused
    h = await meta(redis_client, run.run_id)
    assert h["producer"] == "prod-new"
    assert h["last_seq"] == "0"
    assert await redis_client.exists(KEYS.stream(run.run_id)) == 0  # the run starts anew
    # The old producer does not know yet: its next event is queued, then fenced by Redis.
    assert old.append(run, 3, ev(3))
    assert await old.flush(5)
    assert sample(m, "writer_dropped_events_total", reason="fenced") == 1
    assert not old.append(run, 4, ev(4))
    assert sample(m, "writer_dropped_events_total", reason="fenced") == 2
    old.update_meta(run, {"status": "completed"})  # ignored: a fenced run writes nothing
    assert await old.flush(5)
    assert await redis_client.exists(KEYS.stream(run.run_id)) == 0
    # The new producer's events are the run's.
    assert new.append(taken, 1, b"data: new\n\n")
    assert await new.flush(5)
    rows = await stored(redis_client, run.run_id)
    assert [(r["seq_id"], r["data"]) for r in rows] == [("1", "data: new\n\n")]
    h = await meta(redis_client, run.run_id)
    assert h["producer"] == "prod-new"
    assert h["status"] == "running"
    assert h["last_seq"] == "1"


async def test_renew_renews_the_lease(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, _ = writers(lease_seconds=30)
    run = await opened(w, "lease-1")
    before = await meta(redis_client, run.run_id)
    first_until = int(before["lease_until_ms"])

    async def later() -> bool:
        return await redis_ms(redis_client) > int(before["updated_ms"]) + 2

    await eventually(later, what="Redis time to move on")
    w.renew([run])
    assert await w.flush(5)
    after = await meta(redis_client, run.run_id)
    now = await redis_ms(redis_client)
    assert int(after["lease_until_ms"]) > first_until
    assert 29000 < int(after["lease_until_ms"]) - now <= 30000
    assert int(after["updated_ms"]) > int(before["updated_ms"])
    assert after["status"] == "running"
    assert after["last_seq"] == "0"


# -- through the proxy -----------------------------------------------------------------------


async def test_proxy_refuses_a_run_another_producer_holds(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    writers: WriterFactory,
    http: aiohttp.ClientSession,
) -> None:
    other, _ = writers(lease_seconds=30)
    await opened(other, "held-1", producer="other-pod")
    upstream.sse("/v1/chat", [token("hi"), stop("end_turn"), DONE])
    sc = await make_sidecar()
    async with http.post(sc.url + "/v1/chat", headers={"X-Run-Id": "held-1"}) as resp:
        assert resp.status == 409
        body = await resp.json()
    assert body["error"]["type"] == "run_conflict"
    assert body["error"]["producer"] == "other-pod"
    h = await meta(redis_client, RunId("held-1"))
    assert h["producer"] == "other-pod"
    assert await redis_client.exists(KEYS.stream(RunId("held-1"))) == 0


async def test_proxy_renews_the_lease_of_a_long_quiet_run(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse("/v1/chat", [token("a"), gate, stop("end_turn"), DONE])
    sc = await make_sidecar(lease_seconds=0.3)
    async with http.post(sc.url + "/v1/chat", headers={"X-Run-Id": "quiet-1"}) as resp:
        reader = LiveReader(resp)
        await reader.until(1)
        await gate.reached.wait()
        run_id = RunId("quiet-1")

        async def first_stored() -> bool:
            return (await meta(redis_client, run_id)).get("last_seq") == "1"

        await eventually(first_stored, what="event 1 in Redis")
        first_until = int((await meta(redis_client, run_id))["lease_until_ms"])

        async def renewed() -> bool:
            return int((await meta(redis_client, run_id))["lease_until_ms"]) > first_until

        # No event flows while the gate is shut: only the lease renewal can move the lease.
        await eventually(renewed, timeout=3, what="a lease renewal")
        h = await meta(redis_client, run_id)
        assert h["last_seq"] == "1"
        assert h["status"] == "running"
        gate.open()
        await reader.rest()
    await sc.flushed()
    assert (await meta(redis_client, run_id))["status"] == "completed"


# -- bugs ------------------------------------------------------------------------------------


class SnapshotWriter(Writer):
    """A Writer that records the run's Redis state after each of its round trips."""

    observe: Callable[[], Awaitable[None]]

    async def _round(self, batch: Any, *, overlap: bool) -> bool:
        ok = await super()._round(batch, overlap=overlap)
        await self.observe()
        return ok


async def test_final_meta_never_lands_before_its_event(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    store = RunStore(redis_server.url, KEYS)
    w = SnapshotWriter(store, Metrics(), flush_max_events=10)
    run_id = RunId("meta-order-1")
    snapshots: list[tuple[int, dict[str, str]]] = []
    observer = redis.asyncio.Redis.from_url(redis_server.url)

    async def observe() -> None:
        length = await observer.xlen(KEYS.stream(run_id))
        snapshots.append((length, await meta(observer, run_id)))

    async def observed_all() -> bool:
        return bool(snapshots) and snapshots[-1][0] == 35

    w.observe = observe
    w.start()
    try:
        run = w.open(run_id, "p1", {"status": "running"})
        for seq in range(1, 35):
            assert w.append(run, seq, ev(seq))
        final = {"status": "completed", "stop_reason": "end_turn"}
        assert w.append(run, 35, ev(35), complete=True, meta=final)
        assert await w.flush(5)
        # flush() returns before the last snapshot is taken: wait for it, then stop the writer.
        await eventually(observed_all, what="the snapshot after the last round trip")
    finally:
        await w.close(1.0)
        await store.aclose()
        await observer.aclose()
    assert len(snapshots) >= 4
    # After every round trip, a finished status must come with the complete entry stored.
    for length, h in snapshots:
        if h["status"] != "running":
            assert (length, h["last_seq"]) == (35, "35"), (length, h)


async def test_lease_renewal_after_redis_lost_the_run_keeps_the_run_writable(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    w, m = writers()
    run = await opened(w, "lost-1")
    for seq in (1, 2, 3):
        assert w.append(run, seq, ev(seq))
    assert await w.flush(5)
    await redis_client.flushall()  # Redis restarted empty (or failed over to an empty replica)
    w.renew([run])  # the registry's periodic lease renewal comes first
    assert await w.flush(5)
    assert w.append(run, 4, ev(4), complete=True, meta={"status": "completed"})
    assert await w.flush(5)
    assert sample(m, "writer_dropped_events_total", reason="gap") == 0
    # The three events Redis had confirmed are counted as lost, once.
    assert sample(m, "writer_dropped_events_total", reason="history_lost") == 3
    assert seqs(await stored(redis_client, run.run_id)) == [4]
    h = await meta(redis_client, run.run_id)
    assert (h["incomplete"], h["history_lost_through"]) == ("history_lost", "3")
    assert h["status"] == "completed"
    # The run's initial meta came back with the rebuild.
    assert h["created_ms"] == "1"


async def test_a_run_whose_history_was_lost_still_refuses_a_second_producer(
    writers: WriterFactory, redis_client: redis.asyncio.Redis
) -> None:
    a, _ = writers(lease_seconds=30)
    run = await opened(a, "lost-2", producer="prod-a")
    for seq in (1, 2):
        assert a.append(run, seq, ev(seq))
    assert await a.flush(5)
    await redis_client.flushall()  # Redis restarted empty
    assert a.append(run, 3, ev(3))
    assert await a.flush(5)
    h = await meta(redis_client, run.run_id)
    assert h["incomplete"] == "history_lost"
    assert h["producer"] == "prod-a"
    assert h.get("status") == "running"
    b, _ = writers()
    refused = b.open(RunId("lost-2"), "prod-b", {"status": "running"})
    refusal = await refused.claim
    assert isinstance(refusal, RunConflict)
    assert refusal.producer == "prod-a"
