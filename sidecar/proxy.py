"""The reverse proxy; ``text/event-stream`` responses are handed to the tee (``sidecar.tee``).

Every request is forwarded to the upstream unchanged (minus hop-by-hop headers). A successful
``text/event-stream`` response becomes a run: a ``Tee`` task reads the upstream, relays each
event to the client as soon as it is complete, numbers it, and hands it to the writer. The tee is
detached from the client's connection: when the client leaves, the tee keeps reading the upstream
to the end (or cancels it, per ``on_client_disconnect``), so the stored run is whole either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from yarl import URL

from sidecar.auth import Authorizer
from sidecar.client_out import LiveClient
from sidecar.config import Settings
from sidecar.dialects import hint_for_path
from sidecar.dialects.routes import dialect_for_path
from sidecar.errors import BodyTimeout, InvalidRunId, RequestTooLarge, RunConflict, RunExists
from sidecar.inflate import Inflater, content_coding, decodable, narrow_accept_encoding
from sidecar.keys import RunId, new_generation, new_run_id, validate_run_id
from sidecar.request_body import body_chunks
from sidecar.runs import RunRegistry, new_producer_id
from sidecar.store.meta import initial_meta
from sidecar.tee import Tee
from sidecar.telemetry import Metrics
from sidecar.terminal import Dialect
from sidecar.tracing import trace_ids
from sidecar.writer import RunStream, Writer

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1, plus the pre-standard ones proxies still see.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
RUN_ID_RESPONSE_HEADER = "X-Sidecar-Run-Id"
REPLAY_TOKEN_HEADER = "X-Sidecar-Replay-Token"
_BODYLESS_STATUS = frozenset({204, 304})
# Longest a chosen run id's claim may hold up the response headers (see Proxy._claim_refused).
CLAIM_WAIT_SECONDS = 0.25


def json_error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": {"type": type_, "message": message, **extra}}
    resp = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
    if status == 408:
        resp.force_close()  # the rest of a request that timed out must not be read as the next
    return resp


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones, including any the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(key, value)
    return out


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    ctype = resp.headers.get("Content-Type", "")
    return 200 <= resp.status < 300 and ctype.split(";", 1)[0].strip().lower() == (
        "text/event-stream"
    )


class Proxy:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        writer: Writer,
        runs: RunRegistry,
        metrics: Metrics,
        authorizer: Authorizer,
        tracer: Tracer,
    ) -> None:
        self._s = settings
        self._routes = settings.dialect_route_table
        self._auth = authorizer
        self._tracer = tracer
        self._session = session
        self._writer = writer
        self._runs = runs
        self._m = metrics
        self._base = URL(settings.upstream_url)
        self._host = self._base.host or ""
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.upstream_connect_timeout_seconds,
            sock_read=settings.upstream_read_timeout_seconds,
        )
        self._run_header = settings.run_id_header
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        client_run_id: RunId | None = None
        raw_ids = request.headers.getall(self._run_header, [])
        if len(set(raw_ids)) > 1:
            return json_error(
                400,
                "ambiguous_run_id",
                f"{len(raw_ids)} different {self._run_header} headers: send one run id",
            )
        if raw_ids:
            try:
                client_run_id = validate_run_id(raw_ids[0])
            except InvalidRunId as exc:
                return json_error(400, "invalid_run_id", str(exc))
            if client_run_id in self._runs:
                return json_error(
                    409, "run_conflict", f"run {client_run_id!r} is already being produced"
                )
        length = request.content_length
        if length is not None and length > self._s.max_request_bytes:
            return json_error(
                413, "request_too_large", str(RequestTooLarge(self._s.max_request_bytes))
            )
        started = time.perf_counter()
        headers = self._request_headers(request)
        # The client span covers the request up to the upstream's response headers; a teed
        # stream after that is the sse.run span.
        with self._tracer.start_as_current_span(
            request.method,
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": request.method, "server.address": self._host},
        ) as span:
            propagate.inject(headers)  # W3C traceparent: the upstream continues this trace
            try:
                upstream = await self._session.request(
                    request.method,
                    self._upstream_url(request),
                    headers=headers,
                    data=self._body(request) if request.body_exists else None,
                    allow_redirects=False,
                    timeout=self._timeout,
                    auto_decompress=False,
                )
            except TimeoutError as exc:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR)
                self._m.upstream_errors.labels("timeout").inc()
                return json_error(504, "upstream_timeout", "the upstream did not answer in time")
            except (aiohttp.ClientError, RequestTooLarge, BodyTimeout) as exc:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR)
                # aiohttp wraps what the body generator raised in a ClientOSError.
                if isinstance(too_large := _cause(exc, RequestTooLarge), RequestTooLarge):
                    return json_error(413, "request_too_large", str(too_large))
                if isinstance(silent := _cause(exc, BodyTimeout), BodyTimeout):
                    self._m.bad_requests.labels("body_timeout").inc()
                    log.info("request body timed out: %s", silent)
                    return json_error(408, "request_timeout", str(silent))
                log.warning("upstream request failed: %s", exc)
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                self._m.upstream_errors.labels("connect" if refused else "disconnected").inc()
                return json_error(502, "upstream_unreachable", f"cannot reach the upstream: {exc}")
            span.set_attribute("http.response.status_code", upstream.status)
        if is_event_stream(upstream) and request.method != "HEAD":
            coding = content_coding(upstream.headers.get("Content-Encoding"))
            if not decodable(coding):
                # Never relayed unstored: the request asked only for codings the tee reads.
                upstream.close()
                self._m.upstream_rejected.labels("unsupported_encoding").inc()
                log.warning("refused an event stream in content coding %r", coding[:40])
                return json_error(
                    502,
                    "unsupported_encoding",
                    f"the upstream sent an event stream in content coding {coding[:40]!r}, "
                    "which the sidecar cannot decode and store",
                )
            inflater = Inflater(coding, max_bytes=self._s.max_decompressed_bytes)
            # The tee owns the upstream response from here on.
            return await self._tee(request, upstream, client_run_id, inflater, started)
        try:
            return await self._passthrough(request, upstream)
        finally:
            upstream.release()

    async def aclose(self) -> None:
        """Stop what is left of the tees (at shutdown, after the drain ended every run)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    def _upstream_url(self, request: web.Request) -> URL:
        # raw_path keeps the client's exact percent-encoding and query string.
        return URL(str(self._base) + request.raw_path, encoded=True)

    def _request_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = end_to_end(request.headers)
        headers.popall("Host", None)
        peer = request.remote or ""
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        headers.setdefault("X-Forwarded-Host", request.host)
        # Only codings the tee can decode: whether a response is an event stream to tee is
        # known only once it comes, and an event stream is never relayed unstored.
        if codings := headers.popall("Accept-Encoding", None):
            headers["Accept-Encoding"] = narrow_accept_encoding(codings)
        return headers

    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        limit = self._s.max_request_bytes
        seen = 0
        async for chunk in body_chunks(request, self._s.request_body_idle_timeout_seconds):
            seen += len(chunk)
            if seen > limit:
                raise RequestTooLarge(limit)
            yield chunk

    async def _passthrough(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers = end_to_end(upstream.headers)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if "Content-Length" not in headers and upstream.status not in _BODYLESS_STATUS:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is gone already; cutting the connection is the only honest signal.
            log.warning("upstream failed mid-body, aborting the client response: %s", exc)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _tee(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        client_run_id: RunId | None,
        inflater: Inflater,
        started: float,
    ) -> web.StreamResponse:
        run_id, chosen_by = self._pick_run_id(upstream, client_run_id)
        if run_id in self._runs:
            upstream.close()
            return json_error(409, "run_conflict", f"run {run_id!r} is already being produced")
        span = self._tracer.start_span(
            "sse.run", kind=SpanKind.INTERNAL, attributes={"sse.run_id": run_id}
        )
        setting = dialect_for_path(self._routes, self._s.dialect, request.path)
        dialect = None if setting == "auto" else Dialect(setting)
        hint = hint_for_path(request.path)
        ids = trace_ids(span)
        generation = new_generation()
        meta = initial_meta(
            route="proxy",
            trace_id=ids[0] if ids is not None else None,
            # auto: what ends the run if no event comes; its first event says the rest.
            dialect=(dialect or hint or Dialect.GENERIC).value,
            generation=generation,
        )
        # An id the upstream chose is its own: its work is done, so a stored run of that id is
        # replaced (a new generation). A client-chosen id follows run_id_reuse.
        replace = chosen_by != "client" or self._s.run_id_reuse == "replace"
        stream = self._writer.open(
            run_id, new_producer_id(), meta, span_context=span.get_span_context(), replace=replace
        )
        # The tee's watchdog (the registry's sweep) enforces the read timeout from here on:
        # aiohttp's sock_read timer would be cancelled and armed again on every read.
        if (conn := upstream.connection) is not None and conn.protocol is not None:
            conn.protocol.read_timeout = None
        # The first upstream read starts now; whatever it brings is relayed by the tee.
        first = asyncio.ensure_future(upstream.content.readany())
        try:
            refusal = await self._claim_refused(stream) if chosen_by != "new" else None
        except BaseException:
            first.cancel()
            upstream.close()
            span.end()
            raise
        if refusal is not None:
            first.cancel()
            upstream.close()
            span.set_status(StatusCode.ERROR, "run conflict")
            span.end()
            if isinstance(refusal, RunExists):
                self._m.run_id_reuse.labels("refused").inc()
                return json_error(409, "run_exists", str(refusal))
            return json_error(409, "run_conflict", str(refusal), producer=refusal.producer)
        headers = end_to_end(upstream.headers)
        for name in (
            "Content-Length",
            "Content-Encoding",
            RUN_ID_RESPONSE_HEADER,
            REPLAY_TOKEN_HEADER,
        ):
            headers.popall(name, None)
        headers[RUN_ID_RESPONSE_HEADER] = run_id
        if (token := self._auth.issue(run_id, generation)) is not None:
            headers[REPLAY_TOKEN_HEADER] = token
        headers.setdefault("Cache-Control", "no-cache")
        headers["X-Accel-Buffering"] = "no"
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if request.version >= HttpVersion11:
            # What aiohttp would choose anyway, said explicitly: the live client's chunks are
            # framed by LiveClient itself while it keeps up.
            resp.enable_chunked_encoding()
        tee = Tee(
            run_id=run_id,
            stream=stream,
            settings=self._s,
            writer=self._writer,
            runs=self._runs,
            metrics=self._m,
            upstream=upstream,
            inflater=inflater,
            generation=generation,
            started=started,
            span=span,
            dialect=dialect,
            hint=hint,
            first=first,
        )
        self._m.runs_active.inc()
        client: LiveClient | None = None
        try:
            await resp.prepare(request)
        except (ConnectionError, RuntimeError):
            tee.client_gone()
        else:
            client = LiveClient(
                request,
                resp,
                run_id=run_id,
                buffer_bytes=self._s.live_buffer_bytes,
                write_timeout=self._s.live_write_timeout_seconds,
                metrics=self._m,
                on_left=tee.client_gone,
            )
            tee.attach(client)
        with trace.use_span(span, end_on_exit=False):
            # Created inside: the tee's task runs (and logs) with sse.run as its current span.
            task = asyncio.create_task(tee.run(), name=f"tee:{run_id}")
        tee.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            # Shielded: when aiohttp cancels this handler because the client left, the tee goes
            # on (or cancels the upstream, per on_client_disconnect).
            await tee.wait()
            if client is not None:
                await client.finished()
        except asyncio.CancelledError:
            tee.client_gone()
            if client is not None:
                client.abandon()
            raise
        if stream.replaced:
            self._m.run_id_reuse.labels("replaced").inc()
            log.info(
                "run id reused: a new generation replaced the stored run",
                extra={"run_id": run_id, "chosen_by": chosen_by},
            )
        return resp

    async def _claim_refused(self, stream: RunStream) -> RunConflict | RunExists | None:
        """A run id someone chose may be another producer's, or (run_id_reuse=refuse) a stored
        run's: Redis' answer to the claim (in the writer's next round trip, well under a
        millisecond on a healthy Redis) decides between 200 and 409. The first upstream read
        goes on meanwhile, and the wait is bounded (none at all while Redis is known to be
        down): the client never waits on a struggling Redis. A claim refused after that fences
        the run (not stored; counted as ``conflict``)."""
        if not self._writer.store_down:
            await asyncio.wait((stream.claim,), timeout=CLAIM_WAIT_SECONDS)
        if stream.claim.done() and (refusal := stream.claim.result()) is not True:
            return refusal
        return None

    def _pick_run_id(
        self, upstream: aiohttp.ClientResponse, client_run_id: RunId | None
    ) -> tuple[RunId, Literal["upstream", "client", "new"]]:
        """The run id, and who chose it (a new random one cannot conflict)."""
        raw = upstream.headers.get(self._run_header)
        if raw is not None:
            try:
                return validate_run_id(raw), "upstream"
            except InvalidRunId as exc:
                log.warning("ignoring the upstream's run id: %s", exc)
        if client_run_id is not None:
            return client_run_id, "client"
        return new_run_id(), "new"


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of that kind in its __cause__/__context__ chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
