"""Replay: one cursor from a run's history to its live tail, as an SSE response.

A reader starts after a cursor (``Last-Event-ID``, ``starting_after``, or 0). It catches up with
pages of ``batch_size`` from the store, then follows the live tail through the shared
``Follower`` from the last seq it sent, and ends right after the run's ``complete`` entry (its
terminal; a run's last entry may have no bytes: an end the client saw as the end of its
stream). A hole (events the writer could not store, or history Redis lost) is never streamed
over: the reader gets an error event naming it and the stream is cut. The bytes
it sends are the stored entries' ``data``, which are exactly what the live client received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import HttpVersion11, web
from opentelemetry import trace
from opentelemetry.trace import Tracer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sidecar.auth import Grant
from sidecar.client_out import reset
from sidecar.errors import ApiError, BodyTimeout, RequestTooLarge, StoreError
from sidecar.follow import Follower, Sink
from sidecar.keys import RunId
from sidecar.request_body import read_body
from sidecar.runs import RunRegistry
from sidecar.sse import encode_comment, encode_event
from sidecar.store import Entry, Page, RunMeta, RunStore
from sidecar.telemetry import Metrics
from sidecar.tracing import exemplar

log = logging.getLogger(__name__)

DEFAULT_BATCH = 100
# Catch-up pages asked for ahead of the one being written (see ``Replayer._send_all``).
READ_AHEAD = 2
# How far catch-up pages grow while they come back whole (``_grown``): per reader, the pages
# read ahead hold about READ_AHEAD + 1 times GROWN_PAGE_BYTES (a page of a larger batch_size is
# read one ahead).
GROWN_PAGE_EVENTS = 1000
GROWN_PAGE_BYTES = 128 << 10
MAX_BATCH = 10_000
MAX_CURSOR = 10**18 - 1  # what fits the header and query forms (18 digits)
MAX_BODY_BYTES = 64 << 10  # a replay body is four small fields
# How long a reader cut for not reading keeps its connection to take what was sent already.
SLOW_READER_LINGER_SECONDS = 1.0
MAX_BODY_BYTES = 64 << 10  # a replay body is four small fields
# How long a reader cut for not reading keeps its connection to take what was sent already.
SLOW_READER_LINGER_SECONDS = 1.0
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
    slow: bool = False  # cut because it stopped reading


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def cursor_param(value: str, source: str = "starting_after") -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ApiError(
            400, "bad_cursor", f"{source} must be a non-negative integer seq, got {value[:40]!r}"
        )
    return int(text)


def params_from_query(request: web.Request) -> ReplayParams:
    """GET: cursor from ``Last-Event-ID`` (what EventSource sends), else ``?starting_after``."""
    # Both are checked (a bad one is a 400 even when unused); the header wins.
    query = request.query.get("starting_after")
    cursor = 0 if query is None else cursor_param(query, "starting_after")
    if (header := request.headers.get("Last-Event-ID")) is not None:
        cursor = cursor_param(header, "Last-Event-ID")
    batch = DEFAULT_BATCH
    if (raw := request.query.get("batch_size")) is not None:
        batch = cursor_param(raw, "batch_size")
        if not 1 <= batch <= MAX_BATCH:
            raise ApiError(400, "bad_request", f"batch_size must be 1..{MAX_BATCH}")
    flag = request.query.get("include_pings", "false").lower()
    if flag not in _FLAGS:
        raise ApiError(400, "bad_request", "include_pings must be true or false")
    pings = _FLAGS[flag]
    return ReplayParams(cursor, pings, batch)


def ensure_generation(grant: Grant, generation: str | None) -> None:
    """A per-run token opens the one generation of the run it was issued for."""
    if not grant.admits(generation):
        raise ApiError(
            403, "forbidden", "this token is for an earlier run that had the same run id"
        )


async def params_from_body(request: web.Request, idle_seconds: float) -> ReplayParams:
    """POST (Letta's form): the JSON body; a ``Last-Event-ID`` header still wins."""
    try:
        raw = await read_body(request, idle_seconds, MAX_BODY_BYTES)
    except BodyTimeout as exc:
        raise ApiError(408, "request_timeout", str(exc)) from None
    except RequestTooLarge as exc:
        raise ApiError(413, "request_too_large", str(exc)) from None
    try:
        body = ReplayBody.model_validate_json(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"invalid replay body: {exc}") from None
    cursor = body.starting_after or 0
    if (header := request.headers.get("Last-Event-ID")) is not None:
        cursor = cursor_param(header, "Last-Event-ID")
    pings = True if body.include_pings is None else body.include_pings
    return ReplayParams(cursor, pings, body.batch_size or DEFAULT_BATCH)


class Replayer:
    def __init__(
        self,
        store: RunStore,
        runs: RunRegistry,
        follower: Follower,
        metrics: Metrics,
        *,
        heartbeat_seconds: float,
        buffer_bytes: int,
        write_timeout: float,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._store = store
        self._runs = runs
        self._follower = follower
        self._m = metrics
        self._heartbeat = heartbeat_seconds
        self._buffer_bytes = buffer_bytes
        self._write_timeout = write_timeout

    async def stream(
        self, request: web.Request, run_id: RunId, params: ReplayParams, grant: Grant
    ) -> web.StreamResponse:
        """Validate against the stored run, then stream; refusals raise ``ApiError``."""
        meta = await self._store.meta(run_id) or self._runs.meta(run_id)
        if meta is None:
            raise ApiError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        ensure_generation(grant, meta.generation)
        cursor = params.starting_after
        if not meta.running and cursor >= meta.last_event_seq:
            self._m.replay_requests.labels("no_content").inc()
            return web.Response(status=204)
        if cursor < meta.last_seq:
            await self._check_retained(meta, cursor)
        resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Sidecar-Run-Id": run_id})
        if request.version >= HttpVersion11:
            # What aiohttp would choose anyway, said explicitly: the follower frames the live
            # part's chunks itself (follow.Sink).
            resp.enable_chunked_encoding()
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
                complete = await self._send_all(
                    resp, run_id, cursor, params, sent, meta.last_seq, request.transport
                )
            except TimeoutError as exc:
                # A write that waited write_timeout: the reader stopped reading.
                sent.slow = True
                span.record_exception(exc)
                log.info("replay reader cut: a write timed out", extra={"run_id": run_id})
            except (ConnectionError, RuntimeError, OSError, StoreError) as exc:
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
            # Last-Event-ID), where a clean end would look like a finished run. A close lets a
            # reader that still reads take every complete event sent; one that stopped reading
            # would hold the connection (and its unsent bytes) open, so it is reset soon after.
            transport = request.transport
            transport.close()
            if sent.slow:
                asyncio.get_running_loop().call_later(SLOW_READER_LINGER_SECONDS, reset, transport)
        return resp

    async def _check_retained(self, meta: RunMeta, cursor: int) -> None:
        """Refuse (410) a cursor whose next event is not stored, saying why: each kind of
        loss has its own error type, because each has a different fix."""
        lost = _loss(meta, cursor + 1)
        if lost is not None:
            raise ApiError(410, lost["error_type"], lost["message"], **_fields(lost))
        first = await self._store.first_seq(RunId(meta.run_id))
        if first is None or cursor + 1 < first:
            raise ApiError(
                410,
                "cursor_expired",
                f"events after seq {cursor} are no longer retained",
                first_available_seq=first,
            )

    async def _send_all(
        self,
        resp: web.StreamResponse,
        run_id: RunId,
        cursor: int,
        params: ReplayParams,
        sent: _Sent,
        stored: int,
        transport: asyncio.Transport | None,
    ) -> bool:
        """Stream from history, then live; True when the stream ended cleanly (nothing more)."""
        ended, cursor, stored = await self._catch_up(
            resp, run_id, cursor, params.batch_size, sent, stored
        )
        if ended is not None:
            return ended
        sub = self._follower.subscribe(run_id, cursor, self._buffer_bytes, stored=stored)
        if resp.chunked and transport is not None:
            sub.sink = Sink(transport, linked=exemplar())
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    # Not wait_for: on Python 3.11 that wraps the wait in a new task, on every
                    # delivery to every reader (1,000 readers of a run: 1,000 tasks an event).
                    async with asyncio.timeout(self._heartbeat):
                        await sub.ready.wait()
                except TimeoutError:
                    # A ping only after heartbeat seconds with nothing written.
                    if sub.sink is None or loop.time() - sub.sink.last_write >= self._heartbeat:
                        await self._heartbeat_ping(resp, run_id, params)
                    continue
                if sub.sink is not None:
                    cursor = max(cursor, sub.sink.cursor)  # what the follower wrote for it
                entries = sub.take()
                if entries:
                    cursor = entries[-1].seq
                    if await self._write(resp, entries, sent):
                        return True
                if sub.ended:
                    # Its reconnect gets 204: a clean end is the truth here.
                    return True
                if sub.closed:
                    return False
                if sub.overflowed:
                    sent.slow = True
                    log.warning(
                        "replay reader cut (too slow): it can resume from seq %d",
                        cursor,
                        extra={"run_id": run_id},
                    )
                    self._m.replay_requests.labels("slow_reader").inc()
                    return False
                if sub.gap or sub.lost:
                    await self._hole(resp, run_id, cursor, vanished=sub.lost)
                    return False
        finally:
            self._follower.unsubscribe(sub)
            if sub.sink is not None:
                sent.events += sub.sink.events

    async def _catch_up(
        self,
        resp: web.StreamResponse,
        run_id: RunId,
        cursor: int,
        batch: int,
        sent: _Sent,
        stored: int,
    ) -> tuple[bool | None, int, int]:
        """Send the stored events after ``cursor``, page by page: (True: the run's end was sent,
        False: cut at a hole, None: all stored ones sent, go live), the cursor, the newest seq
        seen stored.

        Pages are read ahead while one is written: in series, a catch-up waits a Redis round
        trip and a client write per page, and the sidecar sat idle half the time. Once a page
        came back whole (as many events as asked for: the run goes on), the next READ_AHEAD
        pages are asked for, each after the seq the page before it ends at if it is whole too
        (a run's seqs are contiguous); a page that is not whole discards the guesses after it.
        And pages grow (``_grown``) from ``batch`` while they come back whole: per page, the
        round trip and the write cost as much as a few hundred events' bytes.
        """
        size = batch
        ahead: deque[tuple[int, int, asyncio.Task[Page]]] = deque()  # (after seq, size, read)
        try:
            while True:
                if ahead:
                    start, asked, task = ahead.popleft()
                    assert start == cursor
                    page = await task
                else:
                    asked = size
                    page = await self._store.page_after(run_id, cursor, asked)
                stored = max(stored, page.newest)
                if page.events:
                    cursor = page.last
                    if page.read == asked == page.events and not page.complete:
                        size = _grown(size, len(page.data) // page.events)
                        start = ahead[-1][0] + ahead[-1][1] if ahead else cursor
                        # Pages larger than that (a large batch_size of large events) are read
                        # one ahead, as before: memory, not round trips, is their cost.
                        depth = READ_AHEAD if len(page.data) <= GROWN_PAGE_BYTES else 1
                        while len(ahead) < depth:
                            read = self._store.page_after(run_id, start, size)
                            ahead.append((start, size, asyncio.create_task(read)))
                            start += size
                    else:
                        _drop(ahead)
                    if await self._send_page(resp, page, sent):
                        return True, cursor, stored
                if page.events < page.read:
                    await self._hole(resp, run_id, cursor, vanished=False)
                    return False, cursor, stored
                if page.read < asked:
                    return None, cursor, stored
        finally:
            _drop(ahead)

    async def _hole(
        self, resp: web.StreamResponse, run_id: RunId, cursor: int, *, vanished: bool
    ) -> None:
        """The next event after ``cursor`` is not stored: say which loss it is, as an error
        event (a reader that does not reconnect learns it), before the stream is cut (one that
        does reconnects and gets the 410 of that loss)."""
        meta = None if vanished else await self._store.meta(run_id)
        lost = _loss(meta, cursor + 1) if meta is not None else _vanished(cursor)
        if lost is None:
            # Trimmed by the length cap before this reader got there: it was too slow.
            log.warning(
                "replay reader cut (outrun by the length cap): it can resume from seq %d",
                cursor,
                extra={"run_id": run_id},
            )
            self._m.replay_requests.labels("slow_reader").inc()
            return
        self._m.replay_requests.labels("lost").inc()
        log.warning(
            "replay reader cut at a hole (%s) after seq %d",
            lost["error_type"],
            cursor,
            extra={"run_id": run_id, "reason": lost["error_type"]},
        )
        error = {"message_type": "error_message", **lost}
        async with asyncio.timeout(self._write_timeout):
            await resp.write(encode_event(orjson.dumps(error).decode(), event="error"))

    async def _send_page(self, resp: web.StreamResponse, page: Page, sent: _Sent) -> bool:
        """Send a catch-up page; True if it ends with the run's last entry."""
        async with asyncio.timeout(self._write_timeout):
            await resp.write(page.data)
        sent.events += page.events
        self._m.replay_events.inc(page.events)
        return page.complete

    async def _write(self, resp: web.StreamResponse, entries: list[Entry], sent: _Sent) -> bool:
        """Send live entries; True once the run's last entry went out."""
        async with asyncio.timeout(self._write_timeout):
            await resp.write(b"".join(e.data for e in entries))
        sent.events += len(entries)
        self._m.replay_events.inc(len(entries))
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


def _grown(size: int, event_bytes: int) -> int:
    """The next catch-up page's size after a whole one of ``size``: doubled, up to
    GROWN_PAGE_EVENTS events and about GROWN_PAGE_BYTES (a page read ahead is held in memory);
    never below what the reader asked for."""
    cap = min(GROWN_PAGE_EVENTS, GROWN_PAGE_BYTES // max(event_bytes, 1))
    return max(size, min(2 * size, cap))


def _drop(ahead: deque[tuple[int, int, asyncio.Task[Page]]]) -> None:
    """Cancel pages read ahead whose outcome (a page, or an error) is no longer wanted;
    retrieved, not logged."""
    while ahead:
        *_, task = ahead.pop()
        task.cancel()
        task.add_done_callback(_discard)


def _discard(task: asyncio.Task[Page]) -> None:
    if not task.cancelled():
        task.exception()


def _loss(meta: RunMeta, seq: int) -> dict[str, Any] | None:
    """Why event ``seq`` of the run is not stored, if the meta records a loss there."""
    if seq <= meta.history_lost_through:
        return {
            "error_type": "history_lost",
            "message": f"Redis lost this run's events up to seq {meta.history_lost_through} "
            "(it restarted empty, was flushed, or failed over to an empty replica)",
            "first_available_seq": meta.history_lost_through + 1,
        }
    gone = meta.history_range_at(seq)
    if gone is not None:
        return {
            "error_type": "history_lost",
            "message": f"Redis lost events {gone[0]}-{gone[1]} of this run after storing them "
            f"(it failed over to a replica that had not received them, or restarted from older "
            f"data); resume after seq {gone[1]}",
            "lost_from": gone[0],
            "lost_to": gone[1],
            "resume_after": gone[1],
        }
    hole = meta.lost_range_at(seq)
    if hole is not None:
        return {
            "error_type": "events_lost",
            "message": f"events {hole[0]}-{hole[1]} of this run were not stored (the writer's "
            f"backlog was over its bound); resume after seq {hole[1]}",
            "lost_from": hole[0],
            "lost_to": hole[1],
            "resume_after": hole[1],
        }
    return None


def _vanished(cursor: int) -> dict[str, Any]:
    return {
        "error_type": "history_lost",
        "message": f"this run vanished from Redis after seq {cursor} (Redis restarted empty, "
        "was flushed, or failed over to an empty replica)",
        "first_available_seq": None,
    }


def _fields(lost: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in lost.items() if k not in ("error_type", "message")}


def ping_event(run_id: str) -> bytes:
    """Letta's keepalive message (``LettaPing``); not numbered, not stored."""
    ping = {
        "id": f"ping-{uuid.uuid4()}",
        "date": datetime.now(UTC).isoformat(),
        "message_type": "ping",
        "run_id": run_id,
    }
    return encode_event(orjson.dumps(ping).decode())
