"""1,000 live replay readers through one sidecar (DESIGN.md "The API": blocked reads are shared
per process, so thousands of readers do not need thousands of Redis connections).

Ten runs are held open at Gates; 1,000 readers follow them (90 per run, plus 100 more of the first
run resuming from a cursor). While every reader is connected and idle, the sidecar holds at most
``redis_max_connections + 3`` Redis connections (the pool, the live tail's blocked read, the cancel
subscription and the Redis health probe) and costs Redis almost nothing; when the runs go on,
every reader gets the complete run, byte for byte as stored. The Redis here is private to the test
so ``CLIENT LIST`` and ``INFO commandstats`` see only this sidecar and the test's own connection.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.keys import RunId
from tests.conftest import Gate, RedisServer, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, LiveReader, eventually, stop, stored, token

RUNS = 10
PER_RUN = 90
EXTRA_ON_FIRST = 100  # resuming from a cursor, on the first run
READERS = RUNS * PER_RUN + EXTRA_ON_FIRST
HELD = 3  # events each run has produced before its gate
EXTRA_CURSOR = 2
AFTER_GATE = 20
IDLE_WINDOW = 2.0
MAX_CONNECTIONS = 8
FDS_NEEDED = 4096


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def admin_redis(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis.url, single_connection_client=True)
    yield client
    await client.aclose()


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


async def sidecar_connections(admin: redis.asyncio.Redis) -> list[dict[str, Any]]:
    me = await admin.client_id()
    return [c for c in await admin.client_list() if int(c["id"]) != me]


async def test_a_thousand_idle_readers_share_a_few_redis_connections(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    private_redis: RedisServer,
    admin_redis: redis.asyncio.Redis,
) -> None:
    enough_fds()
    sc = await make_sidecar(
        redis_url=private_redis.url,
        redis_max_connections=MAX_CONNECTIONS,
        heartbeat_seconds=60.0,  # no ": ping" (and no lease check) inside the measured window
        lease_seconds=120.0,  # producer lease renewals every 40 s: none inside the window
    )
    gates = [Gate() for _ in range(RUNS)]
    for i, gate in enumerate(gates):
        upstream.sse(f"/v1/agents/a{i}/messages/stream", steps(i, gate))
    arrived = 0
    all_arrived = asyncio.Event()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        producers: list[tuple[aiohttp.ClientResponse, LiveReader]] = []
        for i in range(RUNS):
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

        plan = [(run_ids[i % RUNS], 0) for i in range(RUNS * PER_RUN)]
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

        # Everyone connected, caught up, idle: the sidecar's Redis connections.
        connections = await sidecar_connections(admin_redis)
        # The cost of idleness: every command Redis ran over the window, ours excluded.
        await admin_redis.config_resetstat()
        window_start = time.monotonic()
        await asyncio.sleep(IDLE_WINDOW)  # a measurement window, not synchronisation
        stats: dict[str, Any] = await admin_redis.info("commandstats")
        window = time.monotonic() - window_start
        ours = {"cmdstat_config|resetstat", "cmdstat_info"}
        calls = {k: int(v["calls"]) for k, v in stats.items() if k not in ours}
        rate = sum(calls.values()) / window
        print(
            f"\n{READERS} readers caught up in {caught_up:.2f}s; "
            f"sidecar Redis connections while idle: {len(connections)} "
            f"({sorted(str(c.get('cmd')) for c in connections)}); "
            f"commands over {window:.2f}s idle: {calls} = {rate:.2f}/s"
        )
        assert len(connections) <= MAX_CONNECTIONS + 3
        assert rate <= 3.0, calls

        for gate in gates:
            gate.open()
        bodies = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        lives = [await reader.rest() for _, reader in producers]
        for resp, _ in producers:
            resp.release()

    for i, run_id in enumerate(run_ids):
        rows = await stored(admin_redis, RunId(run_id))
        assert [int(r["seq_id"]) for r in rows] == list(range(1, HELD + AFTER_GATE + 3))
        whole = "".join(r["data"] for r in rows).encode()
        assert lives[i] == whole
        from_cursor = "".join(r["data"] for r in rows[EXTRA_CURSOR:]).encode()
        expected = {(run_id, 0): whole, (run_id, EXTRA_CURSOR): from_cursor}
        got = [body for (rid, cursor), body in zip(plan, bodies, strict=True) if rid == run_id]
        assert len(got) == PER_RUN + (EXTRA_ON_FIRST if i == 0 else 0)
        for (rid, cursor), body in zip(plan, bodies, strict=True):
            if rid == run_id:
                assert body == expected[(rid, cursor)]
    assert sc.metric("sse_sidecar_replay_requests_total", outcome="ok") == READERS
    assert sc.metric("sse_sidecar_redis_errors_total", operation="replay") == 0
