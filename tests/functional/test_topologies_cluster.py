"""Redis Cluster (3 primaries + 3 replicas) under redis-py's asyncio cluster client, as built by
sidecar/store/connect.py: what the store can build on.

- A non-transactional pipeline of ``EVALSHA`` calls for runs in many slots goes out as one
  pipelined write per node, the nodes in parallel: one round trip per node.
- Scripts are not replicated: after a failover the new primary answers NOSCRIPT, until
  ``SCRIPT LOAD`` (which redis-py sends to every primary) is sent again.
- After a failover the client's slot map is stale: the first pipeline's commands for the moved
  slots come back MOVED, and redis-py sends each of them again *one by one*.
- SIGKILL of a primary mid-pipeline: its commands' replies are lost (ConnectionError results,
  or the whole pipeline raises); resent, the append script deduplicates them by seq.
- A cluster client with no retries never learns the new topology.
- ``max_connections`` is a hard per-node cap (MaxConnectionsError), hence the slot semaphore.
- The writer, on the store, writes runs through a primary's SIGKILL on a cluster.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import MaxConnectionsError

from sidecar.keys import Keys, RunId
from sidecar.store import RunStore
from sidecar.store.connect import ClientOptions, ClusterClients, connect
from sidecar.store.url import parse_redis_url
from sidecar.telemetry import Metrics
from sidecar.writer import Writer
from tests.functional.helpers import eventually
from tests.functional.topology_helpers import Producer, stored_seqs, stream_key
from tests.topologies import RedisClusterTopology


@pytest.fixture
async def cluster_clients(redis_cluster: RedisClusterTopology) -> AsyncIterator[ClusterClients]:
    clients = connect(parse_redis_url(redis_cluster.url), ClientOptions())
    assert isinstance(clients, ClusterClients)
    await clients.general.script_load(Producer(clients.general).script)
    yield clients
    await clients.aclose()


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """What redis-py writes to the cluster: one count per pipelined write to a node
    ("pipeline <port>") and per single command ("single <name>"). Observes, changes nothing."""
    counts: Counter[str] = Counter()
    pipeline = ClusterNode.execute_pipeline
    single = ClusterNode.execute_command

    async def counted_pipeline(self: ClusterNode, commands: list[Any]) -> bool:
        counts[f"pipeline {self.port}"] += 1
        return await pipeline(self, commands)

    async def counted_single(self: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        counts[f"single {args[0]}"] += 1
        return await single(self, *args, **kwargs)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", counted_pipeline)
    monkeypatch.setattr(ClusterNode, "execute_command", counted_single)
    return counts


def names(n: int, prefix: str) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


async def contiguous(client: RedisCluster, runs: list[str], producer: Producer) -> None:
    """Every run holds 1..n exactly once, and every acknowledged seq is stored."""
    for run in runs:
        seqs = await stored_seqs(client, run)
        assert seqs == list(range(1, len(seqs) + 1)), run
        assert len(seqs) >= producer.acked[run], run


async def test_a_pipeline_of_script_calls_is_one_round_trip_per_node(
    redis_cluster: RedisClusterTopology, cluster_clients: ClusterClients, sends: Counter[str]
) -> None:
    runs = names(300, "rt")
    producer = Producer(cluster_clients.general)
    sends.clear()
    await producer.append(runs, 2)
    ports = sorted(p.port for p in redis_cluster.primaries())
    assert sends == Counter({f"pipeline {port}": 1 for port in ports})
    assert producer.replies == {"code 0": 300}


async def test_after_a_failover_moved_commands_go_one_by_one_and_scripts_must_be_loaded_again(
    redis_cluster: RedisClusterTopology, cluster_clients: ClusterClients, sends: Counter[str]
) -> None:
    runs = names(300, "mv")
    producer = Producer(cluster_clients.general)
    await producer.append(runs, 1)
    old = redis_cluster.primary_for_key(stream_key(runs[0]))
    moved = [r for r in runs if redis_cluster.primary_for_key(stream_key(r)) is old]
    new = redis_cluster.replica_of(old)
    await asyncio.to_thread(redis_cluster.failover, new)
    with new.client() as c:
        assert c.script_exists(producer.sha) == [False]  # SCRIPT LOAD is not replicated
    sends.clear()
    await producer.append(runs, 1)
    # First round: the moved slots answer MOVED; redis-py resends each of those commands on
    # its own (and gets NOSCRIPT); the loader then sends SCRIPT LOAD to every primary; the
    # next round is one pipelined write per node again.
    assert sends[f"pipeline {old.port}"] == 1
    # One send per moved command, plus a second one (old node, MOVED, new node) for the
    # first few, until redis-py has seen reinitialize_steps (5) MOVED and reloads its map.
    assert len(moved) < sends["single EVALSHA"] <= len(moved) + 10
    assert sends["single SCRIPT LOAD"] == 3
    assert sends[f"pipeline {new.port}"] == 1
    assert producer.replies["NoScriptError"] == len(moved)
    await contiguous(cluster_clients.general, runs, producer)
    assert {len(await stored_seqs(cluster_clients.general, r)) for r in runs} == {2}


async def test_sigkill_of_a_primary_mid_pipeline_loses_no_acknowledged_event_and_duplicates_none(
    redis_cluster: RedisClusterTopology, cluster_clients: ClusterClients
) -> None:
    runs = names(150, "kill")
    producer = Producer(cluster_clients.general)
    await producer.append(runs, 1)
    victim = redis_cluster.primary_for_key(stream_key(runs[0]))
    stop = asyncio.Event()

    async def keep_writing() -> None:
        while not stop.is_set():
            await producer.append(runs, 1)

    writing = asyncio.create_task(keep_writing())
    await asyncio.sleep(0.3)
    await asyncio.to_thread(redis_cluster.kill_primary, victim)
    await asyncio.sleep(0.3)
    stop.set()
    await writing
    # Lost replies were answered by resending: some came back as per-command ConnectionError
    # results, some as the whole pipeline raising; NOSCRIPT from the promoted replica.
    lost = producer.replies.get("ConnectionError", 0) + producer.replies.get(
        "ConnectionError (raised)", 0
    )
    assert lost > 0, producer.replies
    assert producer.replies.get("NoScriptError", 0) > 0
    await contiguous(cluster_clients.general, runs, producer)


async def test_a_cluster_pipeline_without_retries_never_learns_the_new_topology(
    redis_cluster: RedisClusterTopology,
) -> None:
    """A failed single command marks the slot map for a refresh; a failed pipeline does so
    only through its retries (it closes the client and starts over): with none, it keeps
    going to the dead node. The store must keep redis-py's retries >= 1."""
    run = "no-retry"
    for retries, recovers in ((0, False), (1, True)):
        clients = connect(parse_redis_url(redis_cluster.url), ClientOptions(retries=retries))
        assert isinstance(clients, ClusterClients)
        await clients.general.script_load(Producer(clients.general).script)
        producer = Producer(clients.general)
        try:
            await producer.append([run], 1)
            if not recovers:
                victim = redis_cluster.primary_for_key(stream_key(run))
                await asyncio.to_thread(redis_cluster.kill_primary, victim)
                for _ in range(5):
                    assert not await producer.round([run], {run: 2})
                # The first round's reply is lost on the old connection, the others fail to
                # connect: every one goes to the dead node.
                failed = producer.replies.get("ConnectionError", 0)
                assert failed + producer.replies.get("ConnectionError (raised)", 0) == 5
            else:
                await asyncio.wait_for(producer.append([run], 1), 10)
        finally:
            await clients.aclose()


async def test_max_connections_is_a_hard_per_node_cap_so_commands_take_a_slot(
    redis_cluster: RedisClusterTopology,
) -> None:
    clients = connect(parse_redis_url(redis_cluster.url), ClientOptions(max_connections=2))
    assert isinstance(clients, ClusterClients)
    general = clients.general
    # Keys on one node: ten blocked reads need ten connections there.
    node = redis_cluster.primary_for_key("{idle}")
    keys = [f"{{idle}}:{i}" for i in range(10)]
    try:
        burst = await asyncio.gather(
            *(general.xread({k: "$"}, block=200) for k in keys), return_exceptions=True
        )
        assert sum(isinstance(r, MaxConnectionsError) for r in burst) == 8

        async def bounded(key: str) -> Any:
            async with clients.slots:
                return await general.xread({key: "$"}, block=200)

        assert await asyncio.gather(*(bounded(k) for k in keys)) == [[]] * 10
        with node.client() as c:
            ours = [x for x in c.client_list() if x.get("cmd") == "xread"]
        assert len(ours) <= 2
    finally:
        await clients.aclose()


async def test_cancel_pubsub_reaches_a_subscriber_on_any_node_and_survives_its_sigkill(
    redis_cluster: RedisClusterTopology, cluster_clients: ClusterClients
) -> None:
    channel = "sse:run:cancel"
    got: list[bytes] = []
    subscribed = asyncio.Event()
    nodes: list[int] = []

    async def listen() -> None:
        while True:
            pubsub = cluster_clients.pubsub()
            try:
                await pubsub.subscribe(channel)
                assert pubsub.connection is not None
                nodes.append(int(pubsub.connection.port))
                subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        got.append(message["data"])
            except (redis.RedisError, OSError):
                subscribed.clear()
                await asyncio.sleep(0.1)
                # Learn the new topology: the next subscriber picks among live nodes.
                await cluster_clients.refresh()
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    listener = asyncio.create_task(listen())
    try:
        await subscribed.wait()
        # A classic PUBLISH reaches every node's subscribers, whichever node it is sent to.
        other = next(p for p in redis_cluster.primaries() if p.port != nodes[0])
        with other.client() as c:
            c.publish(channel, "run-a")

        async def first() -> bool:
            return got == [b"run-a"]

        await eventually(first, what="the cancel message")
        subscriber_node = redis_cluster.node(nodes[0])
        if subscriber_node in redis_cluster.primaries():
            await asyncio.to_thread(redis_cluster.kill_primary, subscriber_node)
        else:
            await asyncio.to_thread(subscriber_node.kill)

        async def resubscribed() -> bool:
            return len(nodes) > 1 and subscribed.is_set()

        await eventually(resubscribed, timeout=15, what="the listener on another node")
        await cluster_clients.general.publish(channel, "run-b")

        async def second() -> bool:
            return got == [b"run-a", b"run-b"]

        await eventually(second, what="the cancel message after the SIGKILL")
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_the_writer_on_the_store_writes_runs_through_a_primary_sigkill_on_a_cluster(
    redis_cluster: RedisClusterTopology, cluster_clients: ClusterClients
) -> None:
    keys = Keys()
    store = RunStore(redis_cluster.url, keys, timeout=5.0)
    writer = Writer(store, Metrics())
    writer.start()
    runs = names(60, "w")
    streams = [
        writer.open(RunId(r), "producer-1", {"status": "running", "created_ms": "1"}) for r in runs
    ]
    victim = redis_cluster.primary_for_key(stream_key(runs[0]))

    async def produce(lo: int, hi: int) -> None:
        for seq in range(lo, hi + 1):
            for run, stream in zip(runs, streams, strict=True):
                writer.append(stream, seq, f"{run}:{seq}".encode())
            await asyncio.sleep(0.01)

    try:
        await produce(1, 20)
        killing = asyncio.create_task(asyncio.to_thread(redis_cluster.kill_primary, victim))
        await produce(21, 60)
        await killing
        await produce(61, 80)
        assert await writer.close(30.0)
    finally:
        await store.aclose()
    for run in runs:
        assert await stored_seqs(cluster_clients.general, run) == list(range(1, 81)), run
        meta: Any = await cluster_clients.general.hgetall(keys.meta(RunId(run)))
        assert meta[b"last_seq"] == b"80"


async def test_the_epoch_probe_covers_every_primary_and_notices_one_that_lost_its_data(
    redis_cluster: RedisClusterTopology,
) -> None:
    store = RunStore(redis_cluster.url, Keys())
    try:
        assert not await store.probe()
        primaries = redis_cluster.primaries()
        for primary in primaries:
            with primary.client() as c:
                assert len(c.keys("sse:run:epoch*")) == 1, primary.name
        # A planned failover: the promoted replica has the key, so nothing was lost.
        await asyncio.to_thread(redis_cluster.failover, redis_cluster.replica_of(primaries[0]))
        assert not await store.probe()
        assert not await store.probe()
        # One primary loses its data (restarted empty, flushed): noticed, once.
        with primaries[1].client() as c:
            c.flushall()
        assert await store.probe()
        assert not await store.probe()
    finally:
        await store.aclose()
