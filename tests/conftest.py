"""Shared fixtures: a real redis-server, a scriptable real upstream, a real sidecar."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio
from aiohttp import web
from opentelemetry.trace import Tracer

from sidecar.app import RUNS, WRITER, create_admin_app, create_app
from sidecar.config import Settings
from sidecar.demo.upstream import create_upstream_app
from sidecar.server import TrafficRunner
from sidecar.telemetry import Metrics

# Redis Cluster and Sentinel fixtures (redis_cluster, sentinel_set, failover_sentinel).
pytest_plugins = ["tests.topologies"]
pytest.register_assert_rewrite("tests.topologies")
from tests.topologies import free_port as free_port  # noqa: E402  (tests import it from here)


class RedisServer:
    """A redis-server child process on a free loopback port, restartable on the same port."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: run `make test`, which installs it")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", "always",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"redis-server did not start:\n{log}")
                time.sleep(0.02)  # polling a child process's port has no event to await
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent Redis a test may stop and start again (data survives restarts)."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


# -- the scriptable upstream ----------------------------------------------------------------


@dataclass
class Gate:
    """A step that waits until the test opens it: synchronisation without sleeps."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def open(self) -> None:
        self.event.set()


RESET = "reset"  # abort the TCP connection mid-response
HANG = "hang"  # never send anything more

Step = bytes | Gate | str


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class Upstream:
    """A real aiohttp server whose routes tests script step by step."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=1 << 30)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}
        self.requests: list[Recorded] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.finished = asyncio.Event()
        self.disconnected = asyncio.Event()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"path": request.path}, status=404)
        return await handler(request)

    def sse(
        self,
        path: str,
        steps: Sequence[Step],
        *,
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> None:
        """Serve ``steps`` as an event stream: bytes are written, gates awaited, RESET aborts."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_type = "text/event-stream"
            await resp.prepare(request)
            try:
                for step in steps:
                    if isinstance(step, Gate):
                        step.reached.set()
                        await step.event.wait()
                    elif step == RESET:
                        assert request.transport is not None
                        request.transport.abort()
                        return resp
                    elif step == HANG:
                        await asyncio.Event().wait()
                    else:
                        assert isinstance(step, bytes)
                        await resp.write(step)
                await resp.write_eof()
                self.finished.set()
            except (ConnectionError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            return resp

        self.routes[path] = handler

    def json(self, path: str, payload: Any, status: int = 200) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(payload, status=status)

        self.routes[path] = handler

    def raw(
        self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        self.routes[path] = handler


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    runner = web.AppRunner(up.app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", up.port).start()
    yield up
    await runner.cleanup()


@pytest.fixture
async def demo_upstream() -> AsyncIterator[str]:
    """The demo LLM service (``sidecar/demo/upstream.py``: Letta, OpenAI Chat and Responses,
    Anthropic, generic) on a free port; its base URL."""
    runner = web.AppRunner(create_upstream_app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# -- the sidecar ----------------------------------------------------------------------------


@dataclass
class Sidecar:
    url: str
    admin_url: str
    settings: Settings
    metrics: Metrics
    app: web.Application
    runner: web.AppRunner
    admin_runner: web.AppRunner

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (so a test
        that does not name a label, e.g. ``dialect``, counts every value of it)."""
        return sum(
            sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    async def flushed(self, timeout: float = 5.0) -> None:
        """Wait until every run has ended and the writer has put everything into Redis."""
        deadline = time.monotonic() + timeout
        runs = self.app[RUNS]
        while len(runs):
            await asyncio.wait([asyncio.ensure_future(r.wait()) for r in runs], timeout=timeout)
            if time.monotonic() > deadline:
                raise TimeoutError("runs still active")
        assert await self.app[WRITER].flush(max(0.1, deadline - time.monotonic()))

    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()
            await self.admin_runner.cleanup()


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def make_sidecar(
    redis_server: RedisServer, upstream: Upstream
) -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def make(*, tracer: Tracer | None = None, **overrides: Any) -> Sidecar:
        values: dict[str, Any] = {
            "upstream_url": upstream.url,
            "redis_url": redis_server.url,
            "host": "127.0.0.1",
            "port": free_port(),
            "admin_port": free_port(),
            "drain_seconds": 2.0,
            "log_format": "text",
        }
        values.update(overrides)
        settings = Settings(**values)
        metrics = Metrics()
        app = create_app(settings, metrics=metrics, tracer=tracer)
        admin = create_admin_app(app)
        runner = TrafficRunner(
            app, settings, metrics, shutdown_timeout=5.0, access_log=None, handler_cancellation=True
        )
        admin_runner = web.AppRunner(admin, access_log=None)
        await runner.setup()
        await admin_runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        await web.TCPSite(admin_runner, "127.0.0.1", settings.admin_port).start()
        sc = Sidecar(
            url=f"http://127.0.0.1:{settings.port}",
            admin_url=f"http://127.0.0.1:{settings.admin_port}",
            settings=settings,
            metrics=metrics,
            app=app,
            runner=runner,
            admin_runner=admin_runner,
        )
        started.append(sc)
        return sc

    yield make
    for sc in started:
        await sc.stop()


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis) -> Sidecar:
    return await make_sidecar()


@pytest.fixture
async def demo_sidecar(
    make_sidecar: SidecarFactory, demo_upstream: str, redis_client: redis.asyncio.Redis
) -> Sidecar:
    """A sidecar in front of the demo LLM service (the dialect and SDK tests)."""
    return await make_sidecar(upstream_url=demo_upstream)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
