"""``sse-sidecar serve --workers N``: N processes serving one traffic port, and their supervisor.

One Python process tees at most what one core does. With ``workers`` > 1 the ``serve`` process
becomes a supervisor: it starts N worker processes (``multiprocessing`` spawn), each a whole
sidecar (its own writer, follower, lease renewals and cancel listener) listening on the traffic
port with ``SO_REUSEPORT``, so the kernel spreads new connections over them. They share Redis and
coordinate through it exactly as replicas do (claims and leases, the cancel channel, the orphan
sweep), so a replay or a cancel may land on any worker.

The supervisor serves the admin port. Each worker's own admin app listens on a Unix socket of
the supervisor's; ``/metrics`` reads every worker's (OpenMetrics, so exemplars survive) and
serves them together, each series labelled ``worker="<index>"``, plus the supervisor's own
(``sse_sidecar_workers``, ``workers_up``, ``worker_restarts_total``). Per-worker series rather
than prometheus_client's multiprocess mode: that mode has no ``set_function`` gauges (the
writer's backlog gauges) and no exemplars, and it would have to merge gauges of processes that
died; with a label, a restarted worker is a counter reset Prometheus already handles, and
``sum without (worker)`` gives the pod's figure. ``/readyz`` is ready while any worker is (the
kernel only hands connections to listening workers); ``/healthz`` answers for the supervisor.

A worker that exits unexpectedly is started again (after a backoff, counted); the others serve
meanwhile. On SIGTERM/SIGINT the supervisor passes the signal to every worker, which shuts down
as a single process does (drain, flush, final scrape), and exits once they all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar.config import Settings
from sidecar.telemetry import SupervisorMetrics

log = logging.getLogger(__name__)

RESTART_START = 0.5
RESTART_MAX = 30.0
# A worker that ran this long before it exited is restarted at once (not a crash loop).
STABLE_SECONDS = 60.0
# How long a scrape or a readiness check waits for one worker.
WORKER_TIMEOUT = 2.0
# A worker checks this often whether its supervisor is still there (and ends if not).
ORPHAN_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process needs to know about its place among the others."""

    index: int
    admin_socket: str
    supervisor_pid: int


def worker_main(settings: Settings, spec: WorkerSpec) -> None:
    """The entry point of a worker process (spawned: a fresh interpreter)."""
    from sidecar.app import serve
    from sidecar.telemetry import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve(settings, worker=spec))


async def watch_supervisor(spec: WorkerSpec, stop: asyncio.Event) -> None:
    """End the worker (as on SIGTERM) if its supervisor died without telling it."""
    while not stop.is_set():
        await asyncio.sleep(ORPHAN_CHECK_SECONDS)
        if os.getppid() != spec.supervisor_pid:
            log.error("the supervisor process is gone: shutting down")
            stop.set()


class _Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket = socket_path
        self.process: BaseProcess | None = None
        self.started = 0.0
        self.failures = 0
        self.session: aiohttp.ClientSession | None = None

    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket),
                timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT),
            )
        return self.session


class _Families:
    """A collector that yields families read from the workers (for prometheus_client's
    exposition functions)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self._s = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="sse-sidecar-workers-")
        self._workers = [
            _Worker(i, str(Path(self._dir) / f"worker-{i}.sock")) for i in range(settings.workers)
        ]
        self._m = SupervisorMetrics(settings.workers)
        self._stopping = False

    # -- processes ---------------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        spec = WorkerSpec(worker.index, worker.socket, os.getpid())
        proc = self._ctx.Process(
            target=worker_main, args=(self._s, spec), name=f"sse-sidecar-worker-{worker.index}"
        )
        proc.start()
        worker.process, worker.started = proc, time.monotonic()
        log.info("worker %d started (pid %s)", worker.index, proc.pid)

    async def _keep(self, worker: _Worker) -> None:
        """Run one worker until shutdown, starting it again whenever it exits early."""
        loop = asyncio.get_running_loop()
        while True:
            self._start(worker)
            proc = worker.process
            assert proc is not None
            await loop.run_in_executor(None, proc.join)
            if self._stopping:
                return
            ran = time.monotonic() - worker.started
            worker.failures = 0 if ran >= STABLE_SECONDS else worker.failures + 1
            delay = min(RESTART_START * 2 ** max(worker.failures - 1, 0), RESTART_MAX)
            self._m.worker_restarts.inc()
            log.error(
                "worker %d (pid %s) exited with %s after %.1fs; the others serve on, it starts "
                "again in %.1fs",
                worker.index,
                proc.pid,
                proc.exitcode,
                ran,
                delay if worker.failures else 0.0,
                extra={"worker": worker.index},
            )
            if worker.failures:
                await asyncio.sleep(delay)
            if self._stopping:
                return

    def _signal_all(self, sig: int) -> None:
        for worker in self._workers:
            proc = worker.process
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    # -- the admin port ----------------------------------------------------------------------

    async def _scrape(self, worker: _Worker) -> list[Metric] | None:
        try:
            async with worker.client().get(
                "http://worker/metrics", headers={"Accept": OPENMETRICS_CONTENT_TYPE}
            ) as resp:
                if resp.status != 200:
                    return None
                body = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        label = str(worker.index)
        families = list(text_string_to_metric_families(body))  # type: ignore[no-untyped-call]
        for family in families:
            family.samples = [
                Sample(s.name, {**s.labels, "worker": label}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
        return families

    async def metrics(self, request: web.Request) -> web.Response:
        scraped = await asyncio.gather(*(self._scrape(w) for w in self._workers))
        merged: dict[str, Metric] = {}
        up = 0
        for families in scraped:
            if families is None:
                continue
            up += 1
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    merged[family.name] = family
                else:
                    into.samples.extend(family.samples)
        self._m.workers_up.set(up)
        for family in self._m.registry.collect():
            merged.setdefault(family.name, family)
        registry = CollectorRegistry()
        registry.register(_Families(list(merged.values())))
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            body: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            content_type = OPENMETRICS_CONTENT_TYPE
        else:
            body = generate_latest(registry)
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _ready(self, worker: _Worker) -> dict[str, Any]:
        proc = worker.process
        state: dict[str, Any] = {"worker": worker.index, "pid": proc.pid if proc else None}
        try:
            async with worker.client().get("http://worker/readyz") as resp:
                state.update(await resp.json())
                state["ready"] = resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            state.update(status="unreachable", ready=False, problems=[type(exc).__name__])
        return state

    async def readyz(self, request: web.Request) -> web.Response:
        workers = await asyncio.gather(*(self._ready(w) for w in self._workers))
        ready = not self._stopping and any(w["ready"] for w in workers)
        body = {"status": "ready" if ready else "unready", "workers": workers}
        return web.json_response(body, status=200 if ready else 503)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": len(self._workers)})

    # -- the whole -------------------------------------------------------------------------------

    async def run(self) -> None:
        admin = web.Application()
        admin.router.add_get("/metrics", self.metrics)
        admin.router.add_get("/healthz", self.healthz)
        admin.router.add_get("/readyz", self.readyz)
        runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self._s.host, self._s.admin_port).start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        keepers = [asyncio.create_task(self._keep(w)) for w in self._workers]
        log.info(
            "sse-sidecar supervisor: %d workers on %s:%d (admin %d)",
            len(self._workers),
            self._s.host,
            self._s.port,
            self._s.admin_port,
        )
        try:
            await stop.wait()
        finally:
            log.info("shutting down %d workers", len(self._workers))
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            # The workers drain and flush as a single process does; /metrics keeps serving
            # meanwhile, so their final counts can be scraped.
            await asyncio.wait(keepers)
            await runner.cleanup()
            for worker in self._workers:
                if worker.session is not None:
                    await worker.session.close()
            log.info("stopped")


def supervise(settings: Settings) -> None:
    asyncio.run(Supervisor(settings).run())
