"""Wiring: the only place that builds the parts and connects them.

``create_app(settings)`` returns the traffic application (proxy and replay API) whose
``cleanup_ctx`` owns the store, the writer, the run registry (with the orphan sweep and the
cancel listener), the follower (with the Redis probe) and the upstream session;
``create_admin_app`` returns the admin application (/metrics, /healthz, /readyz); ``serve`` runs
both until SIGTERM/SIGINT and shuts down in order: unready, stop accepting, let running streams
finish for ``drain_seconds``, end the rest with the ``sidecar_shutdown`` terminal, flush the
writer within ``flush_deadline_seconds``, keep /metrics serving for ``metrics_grace_seconds`` (until
one scrape has read the final counts), exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar.api import ROUTES, Api
from sidecar.auth import Authorizer
from sidecar.config import Settings
from sidecar.ending import Finalizer
from sidecar.follow import Follower
from sidecar.keys import Keys
from sidecar.probe import RedisProbe
from sidecar.proxy import Proxy, json_error
from sidecar.replay import Replayer
from sidecar.runs import CancelListener, OrphanSweep, RunRegistry, new_producer_id
from sidecar.runtime import cpu_capacity, tune_gc
from sidecar.server import TrafficRunner
from sidecar.store import RunStore
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause, Status
from sidecar.tracing import exemplar, tracer_of, tracer_provider_from_env
from sidecar.workers import WorkerSpec, watch_supervisor
from sidecar.writer import Writer

log = logging.getLogger(__name__)

# Connections the kernel may hold for the traffic port before the loop accepts them (it caps
# this at net.core.somaxconn). aiohttp's default, 128, overflows when hundreds of clients connect
# within a second to a busy process: the kernel then drops their handshakes (retried after 1 s,
# 3 s, 7 s...) or resets them.
LISTEN_BACKLOG = 4096
# Time the writer gets, after the last run ended, to put what is buffered into Redis.
FLUSH_DEADLINE_SECONDS = 5.0


@dataclass
class State:
    """Mutable process state the admin port reports on."""

    draining: bool = False
    # Shutdown: set once every run has ended and the writer has flushed (the counts are final);
    # then set once a /metrics response written after that has gone out.
    final_counts: bool = False
    final_scrape: asyncio.Event = field(default_factory=asyncio.Event)


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
TRACER = web.AppKey("tracer", Tracer)
STATE = web.AppKey("state", State)
STORE = web.AppKey("store", RunStore)
WRITER = web.AppKey("writer", Writer)
RUNS = web.AppKey("runs", RunRegistry)
FINALIZER = web.AppKey("finalizer", Finalizer)
SWEEP = web.AppKey("sweep", OrphanSweep)
PROXY = web.AppKey("proxy", Proxy)
API = web.AppKey("api", Api)
CANCELS = web.AppKey("cancels", CancelListener)
FOLLOWER = web.AppKey("follower", Follower)
PROBE = web.AppKey("probe", RedisProbe)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The status line a response sent, kept on its request for when the handler is cancelled later.
STATUS_SENT = web.RequestKey("status_sent", int)


def create_app(
    settings: Settings, *, metrics: Metrics | None = None, tracer: Tracer | None = None
) -> web.Application:
    app = web.Application(middlewares=[_observe])
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[TRACER] = tracer if tracer is not None else trace.NoOpTracer()
    app[STATE] = State()
    # One context per resource, each with its own cleanup (run in reverse order), so that one
    # failing cleanup cannot skip another: the writer's flush always runs.
    app.cleanup_ctx.extend((_store, _writer, _runs, _follower, _http))
    app[METRICS].writer_max_bytes.set(settings.writer_max_bytes)
    app.on_response_prepare.append(_remember_status)
    app.on_shutdown.append(_drain)
    for method, path, attr, name in ROUTES:
        app.router.add_route(method, path, _api_handler(attr), name=name)
    # /sidecar/ is the sidecar's own namespace: a path there that matches no route is a client
    # error to report here, not a request for the upstream.
    app.router.add_route("*", "/sidecar/{tail:.*}", _unknown_sidecar_route, name="sidecar_other")
    app.router.add_route("*", "/{tail:.*}", _proxy, name="proxy")
    return app


async def _remember_status(request: web.Request, response: web.StreamResponse) -> None:
    request[STATUS_SENT] = response.status


async def _unknown_sidecar_route(request: web.Request) -> web.StreamResponse:
    return json_error(
        404, "no_such_route", f"no sidecar route {request.method} {request.path} (see README)"
    )


def _api_handler(attr: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        method: Handler = getattr(request.app[API], attr)
        return await method(request)

    return handler


def create_admin_app(traffic: web.Application) -> web.Application:
    admin = web.Application()
    admin[SETTINGS] = traffic[SETTINGS]
    admin[METRICS] = traffic[METRICS]
    admin[STATE] = traffic[STATE]

    async def readyz(request: web.Request) -> web.Response:
        return await _readyz(traffic)

    admin.router.add_get("/metrics", _metrics)
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", readyz)
    return admin


async def _store(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    store = RunStore(
        s.redis_url,
        Keys(s.key_prefix),
        max_connections=s.redis_max_connections,
        timeout=s.redis_timeout_seconds,
        metrics=app[METRICS],
    )
    store.start()
    app[STORE] = store
    try:
        yield
    finally:
        await store.aclose()


async def _writer(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    writer = Writer(
        app[STORE],
        app[METRICS],
        flush_max_events=s.flush_max_events,
        gather_seconds=s.flush_gather_seconds,
        max_bytes=s.writer_max_bytes,
        ttl_seconds=s.stream_ttl_seconds,
        max_stream_events=s.max_stream_events,
        lease_seconds=s.lease_seconds,
        pace_bytes=s.pace_bytes,
        cpu_capacity=cpu_capacity(s.workers),
        tracer=app[TRACER],
    )
    writer.start()
    app[WRITER] = writer
    try:
        yield
    finally:
        # After the tees (whose cleanup comes first): their terminals are in the buffer.
        await writer.close(FLUSH_DEADLINE_SECONDS)


async def _runs(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    store, metrics = app[STORE], app[METRICS]
    runs = RunRegistry(
        app[WRITER],
        s.lease_seconds,
        metrics,
        keepalive_seconds=s.heartbeat_seconds,
        read_timeout_seconds=s.upstream_read_timeout_seconds,
    )
    finalizer = Finalizer(
        store,
        metrics,
        app[TRACER],
        finalizer_id=new_producer_id(),
        ttl_seconds=s.stream_ttl_seconds,
        default_status=Status(s.status_without_stop_reason),
    )
    sweep = OrphanSweep(store, runs, finalizer, metrics, lease_seconds=s.lease_seconds)
    cancels = CancelListener(store, runs, metrics)
    app[RUNS], app[FINALIZER], app[SWEEP], app[CANCELS] = runs, finalizer, sweep, cancels
    for part in (runs, sweep, cancels):
        part.start()
    try:
        yield
    finally:
        for part in (cancels, sweep, runs):
            await part.stop()


async def _follower(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    follower = Follower(app[STORE], app[METRICS])
    probe = RedisProbe(
        app[STORE], app[RUNS], follower, app[METRICS], interval=s.redis_probe_seconds
    )
    app[FOLLOWER], app[PROBE] = follower, probe
    follower.start()
    probe.start()
    app[WRITER].feed(follower)
    try:
        yield
    finally:
        app[WRITER].feed(None)
        await probe.stop()
        await follower.close()


async def _http(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    metrics, tracer = app[METRICS], app[TRACER]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=s.upstream_max_connections),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
    )
    authorizer = Authorizer(
        replay_token=s.replay_token.get_secret_value() if s.replay_token else None,
        signing_key=s.signing_key.get_secret_value() if s.signing_key else None,
        token_ttl_seconds=s.replay_token_ttl_seconds,
    )
    replayer = Replayer(
        app[STORE],
        app[RUNS],
        app[FOLLOWER],
        metrics,
        heartbeat_seconds=s.heartbeat_seconds,
        buffer_bytes=s.replay_buffer_bytes,
        write_timeout=s.replay_write_timeout_seconds,
        tracer=tracer,
    )
    proxy = Proxy(s, session, app[WRITER], app[RUNS], metrics, authorizer, tracer)
    app[PROXY] = proxy
    app[API] = Api(
        app[STORE],
        replayer,
        app[FOLLOWER],
        app[RUNS],
        app[FINALIZER],
        authorizer,
        metrics,
        proxy=proxy.handle,
        body_idle_seconds=s.request_body_idle_timeout_seconds,
    )
    try:
        yield
    finally:
        # First of the cleanups: the tees end (and hand their terminals to the writer) before
        # the writer flushes and the store closes.
        try:
            await proxy.aclose()
        finally:
            await session.close()


async def _drain(app: web.Application) -> None:
    """on_shutdown: listeners are closed; let running tees end, then force the rest, then let
    replay readers go (they resume on another replica with Last-Event-ID)."""
    app[STATE].draining = True
    try:
        await _drain_runs(app)
    finally:
        app[FOLLOWER].close_subscriptions()


async def _drain_runs(app: web.Application) -> None:
    runs = app[RUNS]
    if not len(runs):
        return
    seconds = app[SETTINGS].drain_seconds
    log.info("draining %d running streams for up to %.1fs", len(runs), seconds)

    def forced(n: int) -> None:
        log.warning("%d streams still running after %.1fs: ending them", n, seconds)

    await runs.drain(seconds, EndCause.SIDECAR_SHUTDOWN, forced)


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per request: the server span (continuing the caller's trace) and the HTTP metrics."""
    metrics = request.app[METRICS]
    route = request.match_info.route.name or "other"
    attributes = {"http.request.method": request.method, "url.path": request.path}
    name = request.method  # proxied paths are unbounded: no route in the span name
    resource = request.match_info.route.resource
    if route not in ("proxy", "other") and resource is not None:
        attributes["http.route"] = resource.canonical
        name = f"{request.method} {resource.canonical}"
    started = time.perf_counter()
    code = 500
    with request.app[TRACER].start_as_current_span(
        name,
        context=propagate.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        try:
            resp = await handler(request)
            code = resp.status
            return resp
        except web.HTTPException as exc:
            code = exc.status
            raise
        except asyncio.CancelledError:
            # The client left: what it was sent (if anything) is the status, not an error.
            code = request.get(STATUS_SENT, 499)
            raise
        finally:
            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                span.set_status(StatusCode.ERROR)
            metrics.http_requests.labels(route, request.method, str(code)).inc()
            metrics.http_request_duration.labels(route).observe(
                time.perf_counter() - started, exemplar(span)
            )


async def _metrics(request: web.Request) -> web.StreamResponse:
    registry = request.app[METRICS].registry
    state = request.app[STATE]
    final = state.final_counts  # before the body: a body made earlier may miss the last counts
    if "application/openmetrics-text" in request.headers.get("Accept", ""):
        body: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
        content_type = OPENMETRICS_CONTENT_TYPE
    else:
        body = generate_latest(registry)
        content_type = CONTENT_TYPE_LATEST
    resp = web.Response(body=body, headers={"Content-Type": content_type})
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionResetError:
        return resp  # the scraper left: these counts did not reach it
    if final:
        state.final_scrape.set()
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(traffic: web.Application) -> web.Response:
    problems: list[str] = []  # any of these: not ready
    degraded: list[str] = []  # these only when ready_without_redis is set
    settings = traffic[SETTINGS]
    if traffic[STATE].draining:
        problems.append("draining")
    writer = traffic.get(WRITER)
    store = traffic.get(STORE)
    if writer is None or store is None:
        problems.append("starting")
    else:
        storage: list[str] = []
        if writer.pending_bytes > 0.8 * settings.writer_max_bytes:
            storage.append("writer backlog above 80% of writer_max_bytes")
        # Up as of the last command (the probe sends one every redis_probe_seconds); when it
        # was not, probe again now rather than report a stale failure.
        if not store.health.up and not await traffic[PROBE].probe():
            storage.append(f"redis unreachable: {store.health.last_error}")
        (degraded if settings.ready_without_redis else problems).extend(storage)
    if problems:
        return web.json_response({"status": "unready", "problems": problems}, status=503)
    if degraded:
        return web.json_response({"status": "degraded", "problems": degraded})
    return web.json_response({"status": "ready"})


async def _final_scrape(state: State, grace: float) -> None:
    """Every run has ended and the writer has flushed: keep /metrics up until a scrape has read
    these final counts (sidecar_shutdown among them), for at most ``grace`` seconds."""
    state.final_counts = True
    if grace <= 0:
        return
    log.info("serving the final counts on /metrics for up to %.1fs", grace)
    try:
        await asyncio.wait_for(state.final_scrape.wait(), grace)
    except TimeoutError:
        log.warning("no scrape read the final counts within %.1fs", grace)


async def serve(
    settings: Settings, *, metrics: Metrics | None = None, worker: WorkerSpec | None = None
) -> None:
    """Run the traffic and admin ports until SIGTERM or SIGINT, then shut down in order.

    ``worker``: one of ``serve --workers N``'s processes: the traffic port is shared with the
    other workers (SO_REUSEPORT) and the admin app listens on the supervisor's Unix socket.
    """
    provider = tracer_provider_from_env()
    app = create_app(settings, metrics=metrics, tracer=tracer_of(provider))
    admin = create_admin_app(app)
    grace = settings.drain_seconds + FLUSH_DEADLINE_SECONDS + 5.0
    # handler_cancellation: a client that leaves cancels its handler, which is how a tee learns
    # of it while the upstream is silent (and a passthrough request stops at once).
    runner = TrafficRunner(
        app,
        settings,
        app[METRICS],
        handle_signals=False,
        shutdown_timeout=grace,
        access_log=None,
        handler_cancellation=True,
    )
    admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
    await runner.setup()
    await admin_runner.setup()
    shared = worker is not None
    await web.TCPSite(
        runner, settings.host, settings.port, backlog=LISTEN_BACKLOG, reuse_port=shared
    ).start()
    if worker is None:
        await web.TCPSite(admin_runner, settings.host, settings.admin_port).start()
    else:
        await web.UnixSite(admin_runner, worker.admin_socket).start()
    log.info(
        "sse-sidecar listening on %s:%d (admin %s), upstream %s",
        settings.host,
        settings.port,
        settings.admin_port if worker is None else f"via the supervisor, worker {worker.index}",
        settings.upstream_url,
    )
    if settings.gc_tuning:
        tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(watch_supervisor(worker, stop)) if worker is not None else None
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if watchdog is not None:
            watchdog.cancel()
        app[STATE].draining = True
        await runner.cleanup()
        await _final_scrape(app[STATE], settings.metrics_grace_seconds)
        await admin_runner.cleanup()
        if provider is not None:
            # Export what is still batched: the spans of the shutdown itself included.
            provider.shutdown()
        log.info("stopped")
