"""The live tail across hash slots (sidecar/store/cluster_tail.py), on a real 3+3 Redis Cluster
and on a single Redis: sharded pub/sub wake-ups, then cursor reads. Every entry after a
follower's cursor is delivered once, in order, across slots, nodes and failovers, over one
subscribed connection per primary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis

from sidecar.errors import StoreError
from sidecar.keys import Keys, RunId
from sidecar.store import Entry, RunStore
from sidecar.store.cluster_tail import ClusterTail
from sidecar.store.connect import ClientOptions, ClusterClients, connect
from sidecar.store.url import parse_redis_url
from tests.conftest import RedisServer
from tests.functional.helpers import eventually
from tests.functional.topology_helpers import Producer, stored_seqs, stream_key
from tests.topologies import RedisClusterTopology, command


@dataclass
class Collected:
    """What a tail delivered, per run, in delivery order (the tail's ``TailListener``)."""

    seqs: dict[str, list[int]] = field(default_factory=dict)
    data: dict[str, list[bytes]] = field(default_factory=dict)
    failures: int = 0
    recoveries: int = 0

    def deliver(self, run_id: RunId, after: int, entries: list[Entry]) -> None:
        seqs = self.seqs.setdefault(run_id, [])
        assert entries[0].seq == after + 1, (run_id, after, entries[0].seq)
        seqs.extend(e.seq for e in entries)
        self.data.setdefault(run_id, []).extend(e.data for e in entries)

    def failed(self, error: StoreError) -> None:
        self.failures += 1

    def recovered(self) -> None:
        self.recoveries += 1


@pytest.fixture
async def cluster_clients(redis_cluster: RedisClusterTopology) -> AsyncIterator[ClusterClients]:
    clients = connect(parse_redis_url(redis_cluster.url), ClientOptions())
    assert isinstance(clients, ClusterClients)
    await clients.general.script_load(Producer.script)
    yield clients
    await clients.aclose()


@pytest.fixture
async def cluster_tail(
    redis_cluster: RedisClusterTopology,
) -> AsyncIterator[tuple[ClusterTail, Collected]]:
    """The store's live tail on the cluster (its sharded pub/sub tail)."""
    got = Collected()
    store = RunStore(redis_cluster.url, Keys())
    tail = store.live_tail(got)
    assert isinstance(tail, ClusterTail)
    tail.start()
    yield tail, got
    await tail.close()
    await store.aclose()


def runs(n: int, prefix: str = "run") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


async def delivered_everything(
    got: Collected, client: object, names: list[str], cursors: dict[str, int]
) -> None:
    """Wait until every run's stored entries after its cursor were delivered, then check them
    exactly: no gap, no duplicate, in order, the right bytes."""

    async def done() -> bool:
        for run in names:
            stored = await stored_seqs(client, run)  # type: ignore[arg-type]
            if got.seqs.get(run, []) != [s for s in stored if s > cursors[run]]:
                return False
        return True

    await eventually(done, timeout=20, what="every stored entry delivered once, in order")
    for run in names:
        seqs = got.seqs[run]
        assert seqs == list(range(cursors[run] + 1, cursors[run] + 1 + len(seqs)))
        assert got.data[run] == [f"{run}:{s}".encode() for s in seqs]


def subscribed_clients(node_port: int) -> list[dict[str, str]]:
    """CLIENT LIST entries of a node that hold sharded subscriptions."""
    with redis.Redis(port=node_port) as c:
        raw = command(c, "CLIENT", "LIST")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    rows = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in text.splitlines()]
    return [r for r in rows if int(r.get("ssub", "0")) > 0]


async def test_every_entry_is_delivered_once_in_order_across_slots_and_nodes(
    redis_cluster: RedisClusterTopology,
    cluster_clients: ClusterClients,
    cluster_tail: tuple[ClusterTail, Collected],
) -> None:
    tail, got = cluster_tail
    names = runs(120)
    producer = Producer(cluster_clients.general)
    await producer.append(names, 3)  # history before the followers come
    # Followers join at different points: from the start, mid-history, at the head.
    cursors = {run: i % 4 for i, run in enumerate(names)}
    for run in names:
        tail.follow(RunId(run), cursors[run])
    for _ in range(5):
        await producer.append(names, 2)
    await delivered_everything(got, cluster_clients.general, names, cursors)
    # One subscribed connection per primary, holding the channels of the runs it owns.
    primaries = redis_cluster.primaries()
    assert sorted(tail.nodes) == sorted(f"127.0.0.1:{p.port}" for p in primaries)
    owned = {p.port: 0 for p in primaries}
    for run in names:
        owned[redis_cluster.primary_for_key(stream_key(run)).port] += 1
    for p in primaries:
        subs = subscribed_clients(p.port)
        assert len(subs) == 1
        assert int(subs[0]["ssub"]) == owned[p.port]


async def test_following_while_writes_race_misses_and_repeats_nothing(
    cluster_clients: ClusterClients, cluster_tail: tuple[ClusterTail, Collected]
) -> None:
    tail, got = cluster_tail
    names = runs(60, "race")
    producer = Producer(cluster_clients.general)
    await producer.append(names, 1)
    writing = asyncio.create_task(producer.append(names, 40))
    # Subscribe while the producer appends: subscribe first, then read from the cursor.
    for run in names:
        tail.follow(RunId(run), 0)
        await asyncio.sleep(0)
    await writing
    await delivered_everything(got, cluster_clients.general, names, dict.fromkeys(names, 0))
    assert {len(v) for v in got.seqs.values()} == {41}


async def test_unfollowed_streams_get_nothing_more_and_release_their_subscription(
    redis_cluster: RedisClusterTopology,
    cluster_clients: ClusterClients,
    cluster_tail: tuple[ClusterTail, Collected],
) -> None:
    tail, got = cluster_tail
    producer = Producer(cluster_clients.general)
    await producer.append(["kept", "dropped"], 2)
    tail.follow(RunId("kept"), 0)
    tail.follow(RunId("dropped"), 0)
    both = {"kept": 0, "dropped": 0}
    await delivered_everything(got, cluster_clients.general, ["kept", "dropped"], both)
    tail.unfollow(RunId("dropped"))
    await producer.append(["kept", "dropped"], 3)
    await delivered_everything(got, cluster_clients.general, ["kept"], {"kept": 0})
    assert got.seqs["dropped"] == [1, 2]

    async def released() -> bool:
        port = redis_cluster.primary_for_key(stream_key("dropped")).port
        with redis.Redis(port=port) as c:
            reply = command(c, "PUBSUB", "SHARDNUMSUB", stream_key("dropped") + ":tail")
        return int(reply[1]) == 0

    await eventually(released, what="the dropped stream's subscription released")


@pytest.mark.parametrize("how", ["CLUSTER FAILOVER", "SIGKILL"])
async def test_a_failover_loses_and_repeats_nothing(
    how: str,
    redis_cluster: RedisClusterTopology,
    cluster_clients: ClusterClients,
    cluster_tail: tuple[ClusterTail, Collected],
) -> None:
    tail, got = cluster_tail
    names = runs(90, "fo")
    producer = Producer(cluster_clients.general)
    await producer.append(names, 2)
    for run in names:
        tail.follow(RunId(run), 0)
    await delivered_everything(got, cluster_clients.general, names, dict.fromkeys(names, 0))
    victim = redis_cluster.primary_for_key(stream_key(names[0]))
    moved = [r for r in names if redis_cluster.primary_for_key(stream_key(r)) is victim]
    stop = asyncio.Event()

    async def keep_writing() -> None:
        while not stop.is_set():
            await producer.append(names, 1)

    writing = asyncio.create_task(keep_writing())
    await asyncio.sleep(0.2)
    if how == "SIGKILL":
        await asyncio.to_thread(redis_cluster.kill_primary, victim)
    else:
        await asyncio.to_thread(redis_cluster.failover, redis_cluster.replica_of(victim))
    await asyncio.sleep(0.5)
    stop.set()
    await writing
    await producer.append(names, 1)  # and some after the new topology settled
    await delivered_everything(got, cluster_clients.general, names, dict.fromkeys(names, 0))
    assert tail.stats.reroutes >= len(moved)
    primaries = sorted(f"127.0.0.1:{p.port}" for p in redis_cluster.primaries())

    async def on_primaries_only() -> bool:
        return tail.nodes == primaries

    # A subscription made on a stale slot map may first land on the old primary, now a replica
    # (which relays its shard's messages); it moves once the client's map is current.
    await eventually(on_primaries_only, what="one subscribed connection per primary, no other")


async def test_cost_for_1000_followed_runs_on_3_primaries(
    redis_cluster: RedisClusterTopology,
    cluster_clients: ClusterClients,
    cluster_tail: tuple[ClusterTail, Collected],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Counts (not timings): connections per node, commands per delivered event."""
    tail, got = cluster_tail
    names = runs(1000, "cost")
    producer = Producer(cluster_clients.general)
    await producer.append(names, 1)
    for run in names:
        tail.follow(RunId(run), 1)
    rounds = 20
    for _ in range(rounds):
        await producer.append(names, 1)
    await delivered_everything(got, cluster_clients.general, names, dict.fromkeys(names, 1))
    events = rounds * len(names)
    stats = tail.stats
    assert stats.entries == events
    assert stats.subscribes == len(names)  # one SSUBSCRIBE per run, once
    assert stats.reads <= events + len(names)  # at most one XRANGE per wake-up (plus catch-up)
    for p in redis_cluster.primaries():
        assert len(subscribed_clients(p.port)) == 1
    with capsys.disabled():
        print(
            f"\n[tail cost] 1000 runs x {rounds} events on 3 primaries: "
            f"{stats.wakeups} wake-ups, {stats.reads} XRANGE in {stats.read_rounds} pipelined "
            f"rounds = {stats.reads / events:.3f} XRANGE and {stats.read_rounds / events:.4f} "
            "pipelined rounds per event; subscribed connections per primary: 1"
        )


async def test_the_same_tail_serves_a_single_redis(redis_server: RedisServer) -> None:
    store = RunStore(redis_server.url, Keys(), live_tail="pubsub")
    clients = connect(parse_redis_url(redis_server.url), ClientOptions())
    await clients.general.flushall()
    got = Collected()
    tail = store.live_tail(got)
    assert isinstance(tail, ClusterTail)
    tail.start()
    try:
        names = runs(50, "single")
        producer = Producer(clients.general)
        await producer.append(names, 2)
        for run in names:
            tail.follow(RunId(run), 1)
        for _ in range(3):
            await producer.append(names, 1)
        await delivered_everything(got, clients.general, names, dict.fromkeys(names, 1))
        assert tail.nodes == ["primary"]
    finally:
        await tail.close()
        await store.aclose()
        await clients.aclose()


async def test_a_slot_migration_is_followed_by_writes_and_the_tail(
    redis_cluster: RedisClusterTopology,
    cluster_clients: ClusterClients,
    cluster_tail: tuple[ClusterTail, Collected],
) -> None:
    """Resharding a run's slot mid-stream: while only one of its two keys has moved, the append
    script gets TRYAGAIN (redis-py retries, then gives up: ClusterError); once both moved, ASK
    (redis-py follows it); when the slot is handed over, the old owner sunsubscribes the tail,
    which subscribes on the new one."""
    tail, got = cluster_tail
    run, key = "migrating", stream_key("migrating")
    producer = Producer(cluster_clients.general)
    await producer.append([run], 2)
    tail.follow(RunId(run), 0)
    await delivered_everything(got, cluster_clients.general, [run], {run: 0})
    general = cluster_clients.general
    slot = general.keyslot(key)
    source = redis_cluster.primary_for_key(key)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    await asyncio.to_thread(redis_cluster.start_migration, slot, source, target)
    await producer.append([run], 1)  # keys still on the source: served there
    await asyncio.to_thread(redis_cluster.migrate_keys, source, target, key)
    tryagain = asyncio.create_task(producer.append([run], 1))
    # redis-py resends on TRYAGAIN up to 16 times, 50 ms apart, then gives up with
    # ClusterError("TTL exhausted"): the writer sees that, and retries.
    await eventually(_replied(producer, "ClusterError"), what="TRYAGAIN for a split run")
    await asyncio.to_thread(redis_cluster.migrate_keys, source, target, key + ":meta")
    await tryagain  # both keys moved: ASK to the target, which redis-py follows
    await producer.append([run], 1)
    await asyncio.to_thread(redis_cluster.finish_migration, slot, target)
    await producer.append([run], 2)
    await delivered_everything(got, cluster_clients.general, [run], {run: 0})
    assert got.seqs[run] == list(range(1, 8))
    assert tail.stats.reroutes >= 1

    async def on_target() -> bool:
        return f"127.0.0.1:{target.port}" in tail.nodes

    await eventually(on_target, what="the tail subscribed on the new owner")


def _replied(producer: Producer, outcome: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return producer.replies.get(outcome, 0) > 0

    return check
