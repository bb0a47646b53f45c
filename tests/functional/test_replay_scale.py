"""1,000 live replay readers through one sidecar (DESIGN.md "The API": blocked reads are shared
per process, so thousands of readers do not need thousands of Redis connections), on one Redis
and on a Redis Cluster of 3 primaries.

Runs are held open at Gates (10 on one Redis; 100 on the cluster, spread over its shards);
1,000 readers follow them (900 from the start, and 100 more of the first run resuming from a
cursor). While every reader is connected and idle, the sidecar holds at most
``redis_max_connections + 2`` Redis connections on each primary (the pool, which is per node on a
cluster; the live tail's connection: the blocked XREAD, or a cluster node's sharded
subscriptions; the cancel subscription, on one node) and costs Redis almost nothing; when the
runs go on, every reader gets the complete run, byte for byte as stored. ``CLIENT LIST`` and
``INFO commandstats`` see only this sidecar (the test's own connections are named and left out).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

from sidecar.keys import RunId
from tests.conftest import Gate, RedisServer, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, LiveReader, eventually, stop, stored, token
from tests.topologies import RedisClusterTopology

READERS = 1000
EXTRA_ON_FIRST = 100  # resuming from a cursor, on the first run
HELD = 3  # events each run has produced before its gate
EXTRA_CURSOR = 2
AFTER_GATE = 20
IDLE_WINDOW = 2.0
MAX_CONNECTIONS = 8
FDS_NEEDED = 4096
OURS = "scale-test"  # the test's own connections, left out of the counts


@dataclass
class Target:
    """The Redis the sidecar runs on, as the test measures it: its primaries' ports."""

    url: str
    runs: int
    primaries: list[int]
    client: redis.asyncio.Redis | RedisCluster

    def connections(self) -> dict[int, list[dict[str, Any]]]:
        """The sidecar's connections on each primary (not the test's, not replication's)."""
        out = {}
        for port in self.primaries:
            with redis.Redis(port=port, client_name=OURS) as c:
                rows: list[dict[str, Any]] = c.client_list()
            out[port] = [
                r for r in rows if r.get("name") != OURS and not {"S", "M"} & set(r["flags"])
            ]
        return out

    def reset_stats(self) -> None:
        for port in self.primaries:
            with redis.Redis(port=port, client_name=OURS) as c:
                c.config_resetstat()

    def calls(self) -> dict[str, int]:
        """Commands Redis ran since ``reset_stats``, summed over the primaries (ours left out)."""
        # This test's own connections (named at connect), and replication's heartbeats.
        ours = {
            "cmdstat_config|resetstat",
            "cmdstat_info",
            "cmdstat_client|list",
            "cmdstat_client|setname",
            "cmdstat_hello",
            "cmdstat_replconf",
        }
        total: dict[str, int] = {}
        for port in self.primaries:
            with redis.Redis(port=port, client_name=OURS) as c:
                stats: dict[str, Any] = c.info("commandstats")
            for k, v in stats.items():
                if k not in ours:
                    total[k] = total.get(k, 0) + int(v["calls"])
        return total


@pytest.fixture(params=["redis", "cluster"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    if request.param == "redis":
        server = RedisServer(tmp_path)
        server.start()
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            yield Target(server.url, 10, [server.port], client)
        finally:
            await client.aclose()
            server.stop()
    else:
        cluster: RedisClusterTopology = request.getfixturevalue("redis_cluster")
        nodes = [ClusterNode("127.0.0.1", n.port) for n in cluster.nodes]
        on_cluster = RedisCluster(startup_nodes=nodes, client_name=OURS)
        try:
            yield Target(cluster.url, 100, [p.port for p in cluster.primaries()], on_cluster)
        finally:
            await on_cluster.aclose()


def enough_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FDS_NEEDED:
        wanted = FDS_NEEDED if hard == resource.RLIM_INFINITY else min(FDS_NEEDED, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft < FDS_NEEDED:
        pytest.skip(
            f"{READERS} readers need ~{FDS_NEEDED} file descriptors (client and server side "
            f"of each connection); the limit is {soft} (hard {hard}): raise `ulimit -n`"
        )


def steps(run: int, gate: Gate) -> list[Step]:
    head: list[Step] = [token(f"r{run}-{i}") for i in range(HELD)]
    tail: list[Step] = [token(f"r{run}-{i}") for i in range(HELD, HELD + AFTER_GATE)]
    return [*head, gate, *tail, stop("end_turn"), DONE]


async def test_a_thousand_idle_readers_share_a_few_redis_connections(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    target: Target,
) -> None:
    enough_fds()
    runs, per_run = target.runs, (READERS - EXTRA_ON_FIRST) // target.runs
    sc = await make_sidecar(
        redis_url=target.url,
        redis_max_connections=MAX_CONNECTIONS,
        heartbeat_seconds=60.0,  # no ": ping" (and no lease check) inside the measured window
        lease_seconds=120.0,  # producer lease renewals every 40 s: none inside the window
        # 1,000 readers arrive at once and queue for the 8 connections: on a busy 2-core
        # machine the last ones wait longer than the default 2 s (they would get 503, busy).
        redis_timeout_seconds=10.0,
    )
    gates = [Gate() for _ in range(runs)]
    for i, gate in enumerate(gates):
        upstream.sse(f"/v1/agents/a{i}/messages/stream", steps(i, gate))
    arrived = 0
    all_arrived = asyncio.Event()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        producers: list[tuple[aiohttp.ClientResponse, LiveReader]] = []
        for i in range(runs):
            resp = await http.post(f"{sc.url}/v1/agents/a{i}/messages/stream", json={})
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(HELD)
            producers.append((resp, reader))
        run_ids = [resp.headers["X-Sidecar-Run-Id"] for resp, _ in producers]
        assert all(g.reached.is_set() and not g.event.is_set() for g in gates)

        async def follow(run_id: str, cursor: int) -> bytes:
            nonlocal arrived
            url = f"{sc.url}/sidecar/v1/runs/{run_id}/stream?starting_after={cursor}"
            async with http.get(url) as resp:
                assert resp.status == 200, await resp.text()
                reader = LiveReader(resp)
                await reader.until(HELD - cursor, timeout=15)
                arrived += 1
                if arrived == READERS:
                    all_arrived.set()
                return await reader.rest(timeout=15)

        plan = [(run_ids[i % runs], 0) for i in range(runs * per_run)]
        plan += [(run_ids[0], EXTRA_CURSOR)] * EXTRA_ON_FIRST
        started = time.monotonic()
        tasks = [asyncio.create_task(follow(run_id, cursor)) for run_id, cursor in plan]
        try:
            async with asyncio.timeout(15):
                await all_arrived.wait()
        except TimeoutError:
            failed = [t.exception() for t in tasks if t.done() and t.exception()]
            raise AssertionError(f"{arrived}/{READERS} readers caught up; {failed[:3]}") from None
        caught_up = time.monotonic() - started

        async def all_active() -> bool:
            return sc.metric("sse_sidecar_replay_active") == READERS

        await eventually(all_active, what="every reader to be counted active")

        # Everyone connected, caught up, idle: the sidecar's Redis connections, per primary.
        connections = target.connections()
        # The cost of idleness: every command Redis ran over the window, ours excluded.
        target.reset_stats()
        window_start = time.monotonic()
        await asyncio.sleep(IDLE_WINDOW)  # a measurement window, not synchronisation
        calls = target.calls()
        window = time.monotonic() - window_start
        rate = sum(calls.values()) / window
        print(
            f"\n{READERS} readers on {runs} runs caught up in {caught_up:.2f}s; sidecar Redis "
            "connections while idle, per primary: "
            + ", ".join(
                f"{len(c)} ({sorted(str(x.get('cmd')) for x in c)})" for c in connections.values()
            )
            + f"; commands over {window:.2f}s idle: {calls} = {rate:.2f}/s"
        )
        # The pool, the live tail and the cancel subscription; on a cluster one node also holds
        # the connection redis-py's cluster client keeps for the slot map (CLUSTER SLOTS).
        bound = MAX_CONNECTIONS + 2 + isinstance(target.client, RedisCluster)
        assert all(len(c) <= bound for c in connections.values()), connections
        assert rate <= 3.0, calls

        for gate in gates:
            gate.open()
        bodies = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        lives = [await reader.rest() for _, reader in producers]
        for resp, _ in producers:
            resp.release()

    for i, run_id in enumerate(run_ids):
        rows = await stored(target.client, RunId(run_id))
        assert [int(r["seq_id"]) for r in rows] == list(range(1, HELD + AFTER_GATE + 3))
        whole = "".join(r["data"] for r in rows).encode()
        assert lives[i] == whole
        from_cursor = "".join(r["data"] for r in rows[EXTRA_CURSOR:]).encode()
        expected = {(run_id, 0): whole, (run_id, EXTRA_CURSOR): from_cursor}
        got = [body for (rid, cursor), body in zip(plan, bodies, strict=True) if rid == run_id]
        assert len(got) == per_run + (EXTRA_ON_FIRST if i == 0 else 0)
        for (rid, cursor), body in zip(plan, bodies, strict=True):
            if rid == run_id:
                assert body == expected[(rid, cursor)]
    assert sc.metric("sse_sidecar_replay_requests_total", outcome="ok") == READERS
    assert sc.metric("sse_sidecar_redis_errors_total", operation="replay") == 0
