"""Replay: one cursor from a run's history to its live tail, as an SSE response.

A reader starts after a cursor (``Last-Event-ID``, ``starting_after``, or 0). It catches up with
``XRANGE`` pages of ``batch_size``, then follows the live tail through the shared ``Follower``
from the last seq it sent, and ends right after the run's ``complete`` entry ([DONE]). The bytes
it sends are the stored entries' ``data``, which are exactly what the live client received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Tracer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sidecar.auth import Grant
from sidecar.errors import BodyTimeout, RequestTooLarge
from sidecar.follow import Entry, Follower, parse_entry
from sidecar.keys import Keys, RunId
from sidecar.request_body import read_body
from sidecar.runs import RunMeta, end_orphaned_run, read_meta
from sidecar.sse import encode_comment, encode_event
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause
from sidecar.tracing import exemplar

log = logging.getLogger(__name__)

DEFAULT_BATCH = 100
MAX_BATCH = 10_000
MAX_CURSOR = 10**18 - 1  # what fits the header and query forms (18 digits)
MAX_BODY_BYTES = 64 << 10  # a replay body is four small fields
PING_COMMENT = encode_comment(" ping")
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _integral(value: Any) -> Any:
    # JSON has numbers, not ints: 5.0 is the integer 5 (JSON Schema agrees), 5.5 is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict (no "5" for 5, no true for 1), but a JSON number with a zero fraction is an integer.
JsonInt = Annotated[int, BeforeValidator(_integral)]


class ReplayBody(BaseModel):
    """The Letta-compatible POST body, with Letta's defaults (pings on); null means default.

    ``poll_interval`` is accepted and ignored: nothing polls.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    starting_after: JsonInt | None = Field(None, ge=0, le=MAX_CURSOR)
    include_pings: bool | None = None
    batch_size: JsonInt | None = Field(None, ge=1, le=MAX_BATCH)
    poll_interval: float | None = Field(None, ge=0)


@dataclass(frozen=True, slots=True)
class ReplayParams:
    starting_after: int = 0
    include_pings: bool = False
    batch_size: int = DEFAULT_BATCH


@dataclass(slots=True)
class _Sent:
    """What one replay stream has sent so far."""

    events: int = 0


class ReplayError(Exception):
    """Refused before any byte was streamed: becomes a JSON error response."""

    def __init__(self, status: int, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.extra = extra


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _cursor(value: str, source: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ReplayError(
            400, "bad_cursor", f"{source} must be a non-negative integer seq, got {value[:40]!r}"
        )
    return int(text)


def params_from_query(request: web.Request) -> ReplayParams:
    """GET: cursor from ``Last-Event-ID`` (what EventSource sends), else ``?starting_after``."""
    # Both are checked (a bad one is a 400 even when unused); the header wins.
    query = request.query.get("starting_after")
    cursor = 0 if query is None else _cursor(query, "starting_after")
    if (header := request.headers.get("Last-Event-ID")) is not None:
        cursor = _cursor(header, "Last-Event-ID")
    batch = DEFAULT_BATCH
    if (raw := request.query.get("batch_size")) is not None:
        batch = _cursor(raw, "batch_size")
        if not 1 <= batch <= MAX_BATCH:
            raise ReplayError(400, "bad_request", f"batch_size must be 1..{MAX_BATCH}")
    flag = request.query.get("include_pings", "false").lower()
    if flag not in _FLAGS:
        raise ReplayError(400, "bad_request", "include_pings must be true or false")
    pings = _FLAGS[flag]
    return ReplayParams(cursor, pings, batch)


def ensure_generation(grant: Grant, generation: str | None) -> None:
    """A per-run token opens the one generation of the run it was issued for."""
    if not grant.admits(generation):
        raise ReplayError(
            403, "forbidden", "this token is for an earlier run that had the same run id"
        )


async def params_from_body(request: web.Request, idle_seconds: float) -> ReplayParams:
    """POST (Letta's form): the JSON body; a ``Last-Event-ID`` header still wins."""
    try:
        raw = await read_body(request, idle_seconds, MAX_BODY_BYTES)
    except BodyTimeout as exc:
        raise ReplayError(408, "request_timeout", str(exc)) from None
    except RequestTooLarge as exc:
        raise ReplayError(413, "request_too_large", str(exc)) from None
    try:
        body = ReplayBody.model_validate_json(raw or b"{}")
    except ValueError as exc:
        raise ReplayError(400, "bad_request", f"invalid replay body: {exc}") from None
    cursor = body.starting_after or 0
    if (header := request.headers.get("Last-Event-ID")) is not None:
        cursor = _cursor(header, "Last-Event-ID")
    pings = True if body.include_pings is None else body.include_pings
    return ReplayParams(cursor, pings, body.batch_size or DEFAULT_BATCH)


class Replayer:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        follower: Follower,
        metrics: Metrics,
        *,
        heartbeat_seconds: float,
        buffer_bytes: int,
        write_timeout: float,
        ttl_seconds: int,
        fill: bool,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._redis = redis
        self._keys = keys
        self._follower = follower
        self._m = metrics
        self._heartbeat = heartbeat_seconds
        self._buffer_bytes = buffer_bytes
        self._write_timeout = write_timeout
        self._ttl = ttl_seconds
        self._fill = fill
        self._checked: dict[str, tuple[float, RunMeta | None]] = {}

    async def meta(self, run_id: RunId) -> RunMeta | None:
        """The run's meta, after ending it with ``producer_lost`` if its producer is gone."""
        meta = await read_meta(self._redis, self._keys, run_id)
        if meta is not None and meta.status == "running" and self._lease_expired(meta):
            await self.end_orphan(run_id, EndCause.PRODUCER_LOST, require_dead=True)
            meta = await read_meta(self._redis, self._keys, run_id)
        return meta

    async def end_orphan(self, run_id: RunId, cause: EndCause, *, require_dead: bool) -> bool:
        outcome = await end_orphaned_run(
            self._redis,
            self._keys,
            run_id,
            cause,
            require_dead=require_dead,
            ttl_seconds=self._ttl,
            fill=self._fill,
        )
        if outcome is None:
            return False
        self._m.runs_finished.labels(outcome.status.value, outcome.stop_reason_label).inc()
        if outcome.forced_done is not None:
            self._m.forced_done.labels(outcome.forced_done.value).inc()
        return True

    @staticmethod
    def _lease_expired(meta: RunMeta) -> bool:
        return meta.lease_until_ms is not None and meta.lease_until_ms < time.time() * 1000

    async def stream(
        self, request: web.Request, run_id: RunId, params: ReplayParams, grant: Grant
    ) -> web.StreamResponse:
        """Validate against the stored run, then stream; refusals raise ``ReplayError``."""
        meta = await self.meta(run_id)
        if meta is None:
            raise ReplayError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        ensure_generation(grant, meta.generation)
        cursor = params.starting_after
        key = self._keys.stream(run_id)
        head: Any = await self._redis.xrange(key, "-", "+", count=1)
        first_seq = parse_entry(*head[0]).seq if head else None
        if cursor < meta.last_seq and (first_seq is None or cursor + 1 < first_seq):
            raise ReplayError(
                410,
                "cursor_expired",
                f"events after seq {cursor} are no longer retained",
                first_available_seq=first_seq,
            )
        if meta.status != "running" and cursor >= meta.last_seq:
            if meta.incomplete == "overflow":
                raise ReplayError(410, "events_lost", _lost_message(meta), **_lost_extra(meta))
            self._m.replay_requests.labels("no_content").inc()
            return web.Response(status=204)
        resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Sidecar-Run-Id": run_id})
        await resp.prepare(request)
        self._m.replay_requests.labels("ok").inc()
        self._m.replay_active.inc()
        complete = False
        with self._tracer.start_as_current_span(
            "sse.replay",
            attributes={"sse.run_id": run_id, "sse.cursor": cursor},
        ) as span:
            sent = _Sent()
            try:
                complete = await self._send_all(resp, meta, key, cursor, params, sent)
            except (ConnectionError, TimeoutError, RuntimeError, OSError, RedisError) as exc:
                span.record_exception(exc)
                log.info("replay stream cut: %s", exc, extra={"run_id": run_id})
            finally:
                self._m.replay_active.dec()
                span.set_attributes(
                    {"sse.events": sent.events, "sse.outcome": "complete" if complete else "cut"}
                )
        if complete:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        elif request.transport is not None:
            # Cut before the end: an unterminated body tells the client to resume (with
            # Last-Event-ID), where a clean end would look like a finished run.
            request.transport.close()
        return resp

    async def _send_all(
        self,
        resp: web.StreamResponse,
        meta: RunMeta,
        key: str,
        cursor: int,
        params: ReplayParams,
        sent: _Sent,
    ) -> bool:
        """Stream from history, then live; True when the stream ended cleanly (nothing more)."""
        run_id = RunId(meta.run_id)
        while True:
            page: Any = await self._redis.xrange(key, f"({cursor}-0", "+", count=params.batch_size)
            entries = [parse_entry(entry_id, fields) for entry_id, fields in page]
            if entries:
                cursor = entries[-1].seq
                if await self._write(resp, entries, sent, live=False):
                    return True
            if len(entries) < params.batch_size:
                break
        if await self._ended_before(resp, meta, cursor):
            return True
        sub = self._follower.subscribe(key, cursor, self._buffer_bytes)
        try:
            while True:
                try:
                    await asyncio.wait_for(sub.ready.wait(), self._heartbeat)
                except TimeoutError:
                    await self._heartbeat_ping(resp, run_id, params)
                    current = await self._checked_meta(run_id)
                    if current is None:
                        return True  # the run expired while being followed
                    # The seq last *sent*: the follower may hold entries this reader has not
                    # written yet (they arrived during the awaits above).
                    if await self._ended_before(resp, current, cursor):
                        return True
                    continue
                if sub.closed or sub.broken:
                    if sub.broken:
                        why = "too slow" if sub.overflowed else "outrun by the length cap"
                        log.warning(
                            "replay reader cut (%s): it can resume from seq %d",
                            why,
                            sub.cursor,
                            extra={"run_id": run_id},
                        )
                        self._m.replay_requests.labels("slow_reader").inc()
                    return False
                entries = sub.take()
                if entries:
                    cursor = entries[-1].seq
                    if await self._write(resp, entries, sent, live=True):
                        return True
        finally:
            self._follower.unsubscribe(sub)

    async def _write(
        self, resp: web.StreamResponse, entries: list[Entry], sent: _Sent, *, live: bool
    ) -> bool:
        """Send entries; True once the run's last entry went out."""
        async with asyncio.timeout(self._write_timeout):
            await resp.write(b"".join(e.data for e in entries))
        sent.events += len(entries)
        self._m.replay_events.inc(len(entries))
        if live:
            now_ms = time.time() * 1000
            linked = exemplar()
            for e in entries:
                lag = max(0.0, (now_ms - e.timestamp_ms) / 1000)
                self._m.replay_delivery_lag.observe(lag, linked)
        return entries[-1].complete

    async def _heartbeat_ping(
        self, resp: web.StreamResponse, run_id: RunId, params: ReplayParams
    ) -> None:
        """Keep proxies between us and the reader from closing an idle stream."""
        async with asyncio.timeout(self._write_timeout):
            await resp.write(ping_event(run_id) if params.include_pings else PING_COMMENT)

    async def _checked_meta(self, run_id: RunId) -> RunMeta | None:
        """The run's meta as of at most one heartbeat ago: one read per run per heartbeat,
        however many readers follow it (this is also when a dead producer is noticed)."""
        now = time.monotonic()
        cached = self._checked.get(run_id)
        if cached is not None and now - cached[0] < self._heartbeat:
            return cached[1]
        meta = await self.meta(run_id)
        if len(self._checked) > 10_000:
            self._checked = {k: v for k, v in self._checked.items() if now - v[0] < self._heartbeat}
        self._checked[run_id] = (now, meta)
        return meta

    async def _ended_before(self, resp: web.StreamResponse, meta: RunMeta, cursor: int) -> bool:
        """True when the run has ended and nothing after ``cursor`` will ever come."""
        if meta.status == "running" or cursor < meta.last_seq:
            return False
        if meta.incomplete == "overflow":
            # The writer had to drop the rest of this run: say so, not wait forever.
            error = {"message_type": "error_message", "error_type": "replay_incomplete"}
            error["message"] = _lost_message(meta)
            await resp.write(encode_event(orjson.dumps(error).decode(), event="error"))
        # Otherwise the cursor is at or past the run's end (the reader saw [DONE] live before
        # the writer stored it): its reconnect gets 204.
        return True


def ping_event(run_id: str) -> bytes:
    """Letta's keepalive message (``LettaPing``); not numbered, not stored."""
    ping = {
        "id": f"ping-{uuid.uuid4()}",
        "date": datetime.now(UTC).isoformat(),
        "message_type": "ping",
        "run_id": run_id,
    }
    return encode_event(orjson.dumps(ping).decode())


def _lost_message(meta: RunMeta) -> str:
    return f"events after seq {meta.last_seq} of this run were not stored ({meta.incomplete})"


def _lost_extra(meta: RunMeta) -> dict[str, Any]:
    return {"last_stored_seq": meta.last_seq, "reason": meta.incomplete}
