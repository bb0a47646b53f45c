"""Two real sidecar processes on a Redis Cluster (3 primaries + 3 replicas) and on Sentinel (a
primary, a replica, three sentinels): the tee on A; replay, status and cancel on B.

The primary holding live runs fails over mid-stream (``CLUSTER FAILOVER``, ``SENTINEL
FAILOVER``, SIGKILL of the primary) while A's runs stream and B's readers follow them. Then:
nothing A's clients received is missing from Redis or from B's readers, nothing is duplicated,
each run ends with exactly one terminal, the live client, B's live reader and a replay from 0
on B are byte for byte the same, a run B cancels ends cancelled, and no run is declared
``producer_lost`` while its producer lives (the lease is short, so a failover that outlasted
a lease without the health rule would show it). One failover per topology runs by default; the
others are ``slow``.

And on a cluster, the readers of runs a primary lost (restarted empty, flushed) are told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

from sidecar.keys import Keys, RunId
from sidecar.store.connect import ClientOptions, ClusterClients, connect
from sidecar.store.url import parse_redis_url
from tests.conftest import HANG, Gate, SidecarFactory, Step, Upstream
from tests.functional.helpers import (
    DONE,
    ClientView,
    LiveReader,
    eventually,
    meta,
    stop,
    stored,
    token,
)
from tests.functional.replicas import Replicas
from tests.functional.topology_helpers import Producer, stream_key
from tests.topologies import RedisClusterTopology, SentinelTopology

PATH = "/v1/agents/agent-1/messages/stream"
HELD_PATH = "/v1/agents/agent-2/messages/stream"  # never ends by itself: cancelled on B
RUNS = 12
BEFORE = 5  # events each run has streamed (and stored) before the failover
TICKS = 100  # then one event per run per tick, while the primary fails over
TICK_SECONDS = 0.03
# A short lease (renewed every 2 s) and a quick probe: a failover that made B judge A's leases
# before A could renew them would end A's runs as producer_lost.
FLAGS = {"lease_seconds": 5, "redis_probe_seconds": 0.5, "heartbeat_seconds": 60}
CANCEL = Keys().cancel_channel
DONE_SAMPLE = 'sse_sidecar_forced_done_total{dialect="letta",reason="producer_lost"}'


def steps(gates: list[Gate], *, held: bool = False) -> list[Step]:
    out: list[Step] = [token(f"before-{i}") for i in range(BEFORE)]
    for i, gate in enumerate(gates):
        out += [gate, token(f"tick-{i}")]
    return [*out, HANG] if held else [*out, stop("end_turn"), DONE]


async def tick(gates: list[Gate]) -> None:
    """Let every run stream one more event every TICK_SECONDS (all runs share the gates)."""
    for gate in gates:
        gate.open()
        await asyncio.sleep(TICK_SECONDS)


def check_terminal_once(body: bytes) -> int:
    events = ClientView(200, {}, body).events
    assert [e.data for e in events].count("[DONE]") == 1
    assert events[-1].data == "[DONE]"
    assert [int(e.id or 0) for e in events] == list(range(1, len(events) + 1))
    return len(events)


@dataclass
class Topology:
    """What the test needs of a topology: the sidecars' URL, a client of the data (after the
    failover), the cancel subscribers, and the failover itself."""

    url: str
    client: Callable[[], redis.asyncio.Redis | RedisCluster]
    subscribers: Callable[[], Awaitable[int]]
    fail_over: Callable[[list[RunId]], Awaitable[float]]


def cluster_topology(cluster: RedisClusterTopology, how: str) -> Topology:
    def client() -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.nodes])

    async def subscribers() -> int:
        total = 0
        for node in cluster.nodes:
            if node.alive:
                with node.client() as c:
                    total += int(c.pubsub_numsub(CANCEL)[0][1])
        return total

    async def fail_over(runs: list[RunId]) -> float:
        victim = cluster.primary_for_key(Keys().stream(runs[0]))
        held = [r for r in runs if cluster.primary_for_key(Keys().stream(r)) is victim]
        assert held, "the victim holds live runs"
        if how == "SIGKILL":
            _, took = await asyncio.to_thread(cluster.kill_primary, victim)
            return took
        return await asyncio.to_thread(cluster.failover, cluster.replica_of(victim))

    return Topology(cluster.url, client, subscribers, fail_over)


def sentinel_topology(sentinels: SentinelTopology, how: str) -> Topology:
    def client() -> redis.asyncio.Redis:
        return redis.asyncio.Redis(port=sentinels.primary().port)

    async def subscribers() -> int:
        total = 0
        for node in sentinels.data_nodes:
            if node.alive:
                with node.client() as c:
                    total += int(c.pubsub_numsub(CANCEL)[0][1])
        return total

    async def fail_over(runs: list[RunId]) -> float:
        if how == "SIGKILL":
            _, _, took = await asyncio.to_thread(sentinels.kill_primary)
            return took
        _, took = await asyncio.to_thread(sentinels.failover)
        return took

    return Topology(sentinels.url, client, subscribers, fail_over)


@pytest.fixture
async def replicas(
    upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[Replicas]:
    started = Replicas(http, upstream.url, tmp_path)
    yield started
    await started.close()


async def failover_mid_stream(
    topology: Topology,
    replicas: Replicas,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    what: str,
) -> None:
    gates = [Gate() for _ in range(TICKS)]
    upstream.sse(PATH, steps(gates))
    upstream.sse(HELD_PATH, steps(gates, held=True))
    a, b = await replicas.start(topology.url, topology.subscribers, a=FLAGS, b=FLAGS)

    # A tees the runs; B follows each of them live from 0.
    lives = []
    for path in [PATH] * RUNS + [HELD_PATH]:
        resp = await http.post(a.url + path, json={})
        assert resp.status == 200
        lives.append(LiveReader(resp))
    run_ids = [RunId(live.resp.headers["X-Sidecar-Run-Id"]) for live in lives]
    followers = []
    for run_id in run_ids:
        resp = await http.get(b.run_url(run_id, "/stream"))
        assert resp.status == 200, await resp.text()
        followers.append(LiveReader(resp))
    for live, follower in zip(lives, followers, strict=True):
        await live.until(BEFORE)
        await follower.until(BEFORE, timeout=10)  # stored, and followed on B

    ticking = asyncio.create_task(tick(gates))
    await asyncio.sleep(5 * TICK_SECONDS)  # mid-stream
    started = time.monotonic()
    took = await topology.fail_over(run_ids)

    # B answers status and cancel on the new topology.
    held = run_ids[-1]

    async def answers() -> bool:
        async with http.get(b.run_url(held)) as resp:
            return resp.status == 200 and (await resp.json())["status"] == "running"

    await eventually(answers, timeout=20, what="B's status of a live run after the failover")
    await ticking
    async with http.post(b.run_url(held, "/cancel")) as cancel:
        assert cancel.status == 200, await cancel.text()
        answer = await cancel.json()
    assert (answer["status"], answer["forced_done"]) == ("cancelled", "cancelled")

    bodies_a = [await live.rest(timeout=30) for live in lives]
    bodies_b = [await follower.rest(timeout=30) for follower in followers]
    for live, follower in zip(lives, followers, strict=True):
        live.resp.release()
        follower.resp.release()
    recovered = time.monotonic() - started

    client = topology.client()
    try:
        for i, run_id in enumerate(run_ids):
            n = check_terminal_once(bodies_a[i])
            assert n == BEFORE + TICKS + 2  # + stop_reason and [DONE] (end_turn or cancelled)
            assert bodies_b[i] == bodies_a[i], run_id
            async with http.get(b.run_url(run_id, "/stream")) as resp:
                assert resp.status == 200
                assert await resp.read() == bodies_a[i], run_id
            rows = await stored(client, run_id)
            assert [int(r["seq_id"]) for r in rows] == list(range(1, n + 1)), run_id
            h = await meta(client, run_id)
            assert h["status"] == ("cancelled" if run_id == held else "completed"), h
            assert h.get("forced_done", "") == ("cancelled" if run_id == held else ""), h
            assert not {"incomplete", "lost_ranges", "history_lost_through"} & set(h), h
            async with http.get(b.run_url(run_id)) as resp:
                assert (await resp.json())["status"] == h["status"]
    finally:
        await client.aclose()
    for replica in (a, b):
        assert await replica.metric(http, DONE_SAMPLE) == 0, replica.output()[-3000:]
        # A replica promoted with the data is not a Redis that lost it.
        assert await replica.metric(http, "sse_sidecar_redis_data_lost_total") == 0
    errors_b = await b.metric(http, 'sse_sidecar_redis_errors_total{operation="follow"}')
    with capsys.disabled():
        print(
            f"\n[{what}] topology agreed after {took:.2f}s; every run whole "
            f"{recovered:.1f}s after the failover began; B's live-tail errors: {errors_b:.0f}"
        )


@pytest.mark.parametrize(
    "how", [pytest.param("CLUSTER FAILOVER", marks=pytest.mark.slow), "SIGKILL"]
)
async def test_cluster_failover_mid_stream_loses_and_repeats_nothing(
    how: str,
    redis_cluster: RedisClusterTopology,
    replicas: Replicas,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topology = cluster_topology(redis_cluster, how)
    await failover_mid_stream(topology, replicas, upstream, http, capsys, f"cluster {how}")


@pytest.mark.parametrize(
    "how", ["SENTINEL FAILOVER", pytest.param("SIGKILL", marks=pytest.mark.slow)]
)
async def test_sentinel_failover_mid_stream_loses_and_repeats_nothing(
    how: str,
    failover_sentinel: SentinelTopology,
    replicas: Replicas,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topology = sentinel_topology(failover_sentinel, how)
    await failover_mid_stream(topology, replicas, upstream, http, capsys, f"sentinel {how}")


async def test_readers_of_runs_a_cluster_primary_lost_are_told(
    redis_cluster: RedisClusterTopology,
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A primary loses its data (restarted empty, flushed): the probe's epoch key on that
    primary notices, and the readers of its runs, produced elsewhere and quiet, get an error
    event and a cut instead of waiting for entries that will never come. Readers of runs on the
    other primaries go on."""
    sc = await make_sidecar(redis_url=redis_cluster.url, redis_probe_seconds=0.2)
    clients = connect(parse_redis_url(redis_cluster.url), ClientOptions())
    assert isinstance(clients, ClusterClients)
    await clients.general.script_load(Producer.script)
    runs = [f"lost-{i}" for i in range(12)]
    producer = Producer(clients.general, sse=True)
    try:
        await producer.append(runs, 2)  # running runs, their producer elsewhere (quiet)
        # Not the primary of the slot of a plain "sse:run:epoch" key: one epoch key (as on one
        # Redis) would not notice this primary's loss.
        plain = redis_cluster.primary_for_key(Keys().epoch)
        victim = next(
            p for p in map(redis_cluster.primary_for_key, map(stream_key, runs)) if p is not plain
        )
        on_victim = [r for r in runs if redis_cluster.primary_for_key(stream_key(r)) is victim]
        elsewhere = [r for r in runs if r not in on_victim]
        assert elsewhere
        readers = {}
        for run in runs:
            resp = await http.get(f"{sc.url}/sidecar/v1/runs/{run}/stream")
            assert resp.status == 200
            readers[run] = LiveReader(resp)
            await readers[run].until(2)

        async def probed() -> bool:
            return sc.metric("sse_sidecar_redis_up") == 1

        await eventually(probed, what="the sidecar's first probe")
        with victim.client() as c:
            c.flushall()
        for run in on_victim:
            # An error event, then a cut (the client library may drop the last bytes read
            # before the cut): never a clean end.
            with pytest.raises(aiohttp.ClientPayloadError):
                await readers[run].rest(timeout=10)
            last = readers[run].events[-1]
            assert last.id == "2" or last.event == "error", readers[run].body
            assert "history_lost" in (last.data or "") or last.id == "2"
        assert sc.metric("sse_sidecar_redis_data_lost_total") == 1
        # Each of them was told (the error event went out before the cut).
        assert sc.metric("sse_sidecar_replay_requests_total", outcome="lost") == len(on_victim)
        # The others follow on.
        await producer.append(elsewhere, 1)
        for run in elsewhere:
            await readers[run].until(3)
            assert [int(e.id or 0) for e in readers[run].events] == [1, 2, 3]
    finally:
        for reader in readers.values():
            reader.resp.release()
        await clients.aclose()
