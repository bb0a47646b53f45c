"""Fixtures of the fault suite: Redis processes, the forwarder, sidecar processes, traffic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.conftest import Upstream
from tests.faults.forwarder import ForwarderProcess
from tests.faults.harness import (
    FaultRedis,
    SidecarFactory,
    SidecarProcess,
    Traffic,
    start_sidecar,
)

RedisFactory = Callable[..., FaultRedis]
ForwarderFactory = Callable[[FaultRedis], Awaitable[ForwarderProcess]]
DirectFactory = Callable[[FaultRedis], redis.asyncio.Redis]


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[RedisFactory]:
    """``make_redis(aof=True)``: a private redis-server (AOF with fsync always, or nothing
    persisted: a restart comes back empty)."""
    servers: list[FaultRedis] = []

    def make(*, aof: bool = True) -> FaultRedis:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = FaultRedis(workdir, persistent=aof)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.proc is not None:
            server.stop()


@pytest.fixture
async def forwarder() -> AsyncIterator[ForwarderFactory]:
    """``await forwarder(redis)``: a TCP forwarder in front of that Redis (its own process)."""
    started: list[ForwarderProcess] = []

    async def make(server: FaultRedis) -> ForwarderProcess:
        fwd = ForwarderProcess(server.port)
        await fwd.start()
        started.append(fwd)
        return fwd

    yield make
    for fwd in started:
        await fwd.aclose()


@pytest.fixture
async def direct() -> AsyncIterator[DirectFactory]:
    """``direct(redis)``: the test's own client, straight to Redis (never through faults)."""
    clients: list[redis.asyncio.Redis] = []

    def make(server: FaultRedis) -> redis.asyncio.Redis:
        # A command on a connection that died with a killed Redis is sent again on a new one.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        client = redis.asyncio.Redis.from_url(server.url, retry=retry)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def sidecars(
    upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[SidecarFactory]:
    """``await sidecars("a", redis_url, **flags)``: a ``python -m sidecar serve`` process."""
    started: list[SidecarProcess] = []

    async def make(name: str, redis_url: str, **flags: Any) -> SidecarProcess:
        sc = await start_sidecar(
            name, upstream=upstream, redis_url=redis_url, http=http, workdir=tmp_path, **flags
        )
        started.append(sc)
        return sc

    yield make
    for sc in started:
        if sc.alive:
            sc.proc.kill()
            await sc.proc.wait()


@pytest.fixture
async def traffic(upstream: Upstream) -> AsyncIterator[Traffic]:
    t = Traffic(upstream)
    yield t
    await t.aclose()
