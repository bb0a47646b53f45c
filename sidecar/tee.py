"""The tee: one run from the upstream's first byte to its terminal.

A ``Tee`` reads the upstream's ``text/event-stream`` body, relays each event to the client as soon
as it is complete, numbers it, and hands it to the writer. It runs as its own task, detached from
the client's connection: when the client leaves, the tee keeps reading the upstream to the end (or
cancels it, per ``on_client_disconnect``), so the stored run is whole either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from opentelemetry.trace import Span

from sidecar.client_out import LiveClient
from sidecar.config import Settings
from sidecar.dialects import detect, new_tracker
from sidecar.ending import record_end
from sidecar.errors import CorruptEncoding, DecompressedTooLarge, EventTooLarge
from sidecar.inflate import Inflater
from sidecar.keys import RunId
from sidecar.payload import parse_payload, render_event
from sidecar.runs import RunRegistry
from sidecar.sse import Comment, Event, SSEDecoder, encode_comment, encode_event
from sidecar.store.meta import final_meta
from sidecar.telemetry import Metrics
from sidecar.terminal import (
    Dialect,
    DialectTracker,
    EndCause,
    Outcome,
    Status,
    Synthesized,
    Transition,
)
from sidecar.tracing import exemplar
from sidecar.upstream_in import GATED_SLICE, read_directly, readable_directly
from sidecar.writer import RunStream, Writer

log = logging.getLogger(__name__)

# After its terminal the upstream normally ends its response at once; what it sends past it is
# read and dropped, within these bounds, before the connection is given back.
UPSTREAM_SETTLE_SECONDS = 1.0
UPSTREAM_SETTLE_BYTES = 64 << 10
KEEPALIVE = encode_comment(" keep-alive")
READ_TIMEOUT_DETAIL = "no data from the upstream within the read timeout"


class Tee:
    """One run: upstream bytes in; client bytes, stored events and the terminal out."""

    def __init__(
        self,
        *,
        run_id: RunId,
        stream: RunStream,
        settings: Settings,
        writer: Writer,
        runs: RunRegistry,
        metrics: Metrics,
        upstream: aiohttp.ClientResponse,
        inflater: Inflater,
        generation: str,
        started: float,
        span: Span,
        dialect: Dialect | None,
        hint: Dialect | None = None,
        first: asyncio.Future[bytes] | None = None,
    ) -> None:
        self._run_id = run_id
        self._first = first
        self._generation = generation
        self._span = span
        self._bytes = 0
        self._counted_events = 0
        self._counted_bytes = 0
        self._stream = stream
        self._writer = writer
        self._pacer = writer.pacer
        # The upstream connection's transport while its body is read directly (the pacer
        # pauses it).
        self._transport: asyncio.Transport | None = None
        self._runs = runs
        self._m = metrics
        self._upstream = upstream
        self._inflater = inflater
        self._started = started
        self._cancel_on_disconnect = settings.on_client_disconnect == "cancel"
        self._read_timeout = settings.upstream_read_timeout_seconds
        self._decoder = SSEDecoder(settings.max_event_bytes)
        self._default_status = Status(settings.status_without_stop_reason)
        # auto (dialect None) decides at the first data event; the hint decides a run that had
        # none.
        self._hint = hint
        self._tracker: DialectTracker | None = None
        self._fill = False
        if dialect is not None:
            self._start_tracker(dialect)
        self._client: LiveClient | None = None
        self._seq = 0
        self._first_event_at: float | None = None
        self._cancel_cause: EndCause | None = None
        self._cancel_detail: str | None = None
        self._client_left = False
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._sent_at = self._loop.time()  # when the client was last sent anything
        self._read_at = self._sent_at  # when the upstream last sent anything
        # Blocks without data (retry only): sent and stored with the next event, so that a
        # replay gets them exactly where the live client did.
        self._carry: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.outcome: Outcome | None = None
        # Resolved when the run has ended: its last event is queued for the client and the
        # writer. The task may go on briefly after that to let the upstream finish its response.
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        runs.add(self)

    @property
    def run_id(self) -> RunId:
        return self._run_id

    @property
    def stream(self) -> RunStream:
        return self._stream

    @property
    def generation(self) -> str:
        return self._generation

    def attach(self, client: LiveClient) -> None:
        self._client = client

    def _start_tracker(self, dialect: Dialect) -> DialectTracker:
        """The run's dialect is known: its tracker, and the run counts as started in it (so that
        runs_started and runs_finished pair per dialect)."""
        tracker = self._tracker = new_tracker(dialect, self._default_status)
        self._fill = tracker.fills_ids
        self._m.runs_started.labels("proxy", dialect.value).inc()
        self._span.set_attribute("sse.dialect", dialect.value)
        return tracker

    def client_gone(self) -> None:
        """The client went away by itself (a client the sidecar cut is no departure)."""
        client, self._client = self._client, None
        if self._client_left or (client is not None and client.cut):
            return
        self._client_left = True
        self._m.client_disconnects.inc()
        self._span.add_event("client_disconnected", {"sse.seq": self._seq})
        log.info("client left mid-stream", extra={"run_id": self._run_id})
        if self._cancel_on_disconnect:
            self.cancel(EndCause.CANCELLED)

    def cancel(self, cause: EndCause, detail: str | None = None) -> None:
        """End the run early with ``cause``'s terminal (cancel API, shutdown, client policy,
        the upstream's read timeout)."""
        if self._cancel_cause is not None or (self.task is not None and self.task.done()):
            return
        self._cancel_cause = cause
        self._cancel_detail = detail
        if self.task is not None:
            self.task.cancel()

    async def wait(self) -> None:
        await asyncio.shield(self.ended)

    async def run(self) -> None:
        try:
            cause = await self._produce()
        except BaseException as exc:
            self._upstream.close()
            self._runs.remove(self)
            self._span.record_exception(exc)
            self._span.end()
            if not self.ended.done():
                if isinstance(exc, asyncio.CancelledError):
                    self.ended.cancel()
                else:
                    self.ended.set_exception(exc)
            raise
        if cause is None:
            await self._settle_upstream()

    async def _produce(self) -> EndCause | None:
        """The run from its first byte to its terminal; returns why it ended early, if it did."""
        cause: EndCause | None = self._cancel_cause
        detail: str | None = self._cancel_detail
        try:
            if cause is None:
                cause, detail = await self._pump()
        except asyncio.CancelledError:
            if self._cancel_cause is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            cause, detail = self._cancel_cause, self._cancel_detail
        if cause is not None:
            # Cancelled or failed: closing the connection is what tells the upstream to stop.
            self._upstream.close()
        await self._finish(cause, detail)
        self._runs.remove(self)
        if self._client is not None:
            # The protocol has no words for a forced end of a generic stream: the client sees
            # the broken stream the upstream gave, not a clean end that would look finished.
            self._client.end(cut=self._cut_client())
        self.ended.set_result(None)
        return cause

    def _cut_client(self) -> bool:
        outcome, tracker = self.outcome, self._tracker
        return (
            outcome is not None
            and outcome.forced_done is not None
            and tracker is not None
            and tracker.cuts_client_on_forced
        )

    async def _settle_upstream(self) -> None:
        """After the terminal: let the upstream end its response, so it sees a clean finish (not a
        reset on its last write) and the connection goes back to the pool."""
        try:
            async with asyncio.timeout(UPSTREAM_SETTLE_SECONDS):
                discarded = 0
                while discarded <= UPSTREAM_SETTLE_BYTES and (
                    chunk := await self._upstream.content.readany()
                ):
                    discarded += len(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        if self._upstream.content.at_eof():
            self._upstream.release()
        else:
            self._upstream.close()

    async def _pump(self) -> tuple[EndCause | None, str | None]:
        """Read the upstream until its own terminal (cause None) or until it ends some other
        way."""
        content = self._upstream.content
        try:
            if self._first is not None:
                first, self._first = self._first, None
                chunk = await first
                if not chunk:
                    return EndCause.EOF, None
                if (end := await self._take_paced(chunk)) is not None:
                    return end
            if self._inflater.identity and readable_directly(content):
                # Each piece on the parser's call, no task step per chunk (upstream_in.py).
                connection = self._upstream.connection
                self._transport = connection.transport if connection is not None else None
                try:
                    gate = self._gate if self._pacer.enabled else None
                    return await read_directly(content, self._take_direct, gate) or (
                        EndCause.EOF,
                        None,
                    )
                finally:
                    self._pacer.let_go(self)
            async for chunk in content.iter_any():
                self._read_at = self._loop.time()
                # While the pacer holds, aiohttp's reader pauses the connection once its
                # buffer is full.
                if (end := await self._take_paced(chunk)) is not None:
                    return end
        except TimeoutError:
            return EndCause.UPSTREAM_TIMEOUT, READ_TIMEOUT_DETAIL
        except (aiohttp.ClientError, OSError) as exc:
            # aiohttp raises a broken connection's error before it hands out the bytes that
            # arrived ahead of it; those are events the upstream did send, so keep them.
            if (leftover := _take_buffered(content)) and (end := await self._take(leftover)):
                return end
            return EndCause.UPSTREAM_ERROR, f"{type(exc).__name__}: {exc}"
        return EndCause.EOF, None

    async def _take(self, chunk: bytes) -> tuple[EndCause | None, str | None] | None:
        """Relay and store the events in one upstream chunk; how the run ended, if it did."""
        try:
            # A compressed chunk decodes in bounded pieces, with a turn for everything else
            # between two of them (a 130 KB gzip chunk may hold 130 MB of events).
            for i, piece in enumerate(self._inflater.feed(chunk)):
                if i:
                    await asyncio.sleep(0)
                if (end := self._take_piece(piece)) is not None:
                    return end
        except (DecompressedTooLarge, CorruptEncoding) as exc:
            reason = (
                "decompressed_bytes"
                if isinstance(exc, DecompressedTooLarge)
                else "corrupt_encoding"
            )
            self._m.upstream_rejected.labels(reason).inc()
            return EndCause.UPSTREAM_ERROR, str(exc)
        return None

    def _take_direct(self, piece: bytes) -> tuple[EndCause | None, str | None] | None:
        """``_take`` for a body read directly (identity coding: one piece per chunk)."""
        self._read_at = self._loop.time()
        return self._take_piece(piece)

    def _gate(self, resume: Callable[[], None]) -> bool:
        """Before a direct read's pieces are taken: whether the pacer holds them (and pauses
        the connection) until it calls ``resume``."""
        if not self._pacer.engaged():
            return False
        self._pacer.hold(self, resume, self._transport)
        return True

    async def _take_paced(self, chunk: bytes) -> tuple[EndCause | None, str | None] | None:
        """``_take`` in slices, each once the pacer lets the tees read (as a direct read's
        gate does, upstream_in.py)."""
        if not self._pacer.enabled:
            return await self._take(chunk)
        for start in range(0, len(chunk), GATED_SLICE):
            if self._pacer.engaged():
                await self._pacer.released()
            if (end := await self._take(chunk[start : start + GATED_SLICE])) is not None:
                return end
        return None

    def _take_piece(self, piece: bytes) -> tuple[EndCause | None, str | None] | None:
        try:
            items = self._decoder.feed(piece)
        except EventTooLarge as exc:
            self._relay(exc.completed)
            self._flush_client()
            self._m.upstream_rejected.labels("event_bytes").inc()
            return EndCause.UPSTREAM_ERROR, str(exc)
        done = self._relay(items)
        self._flush_client()
        return (None, None) if done else None

    def _relay(self, items: list[Comment | Event]) -> bool:
        """Number, store and queue for the client each item; True once the protocol's own
        terminal went through."""
        for item in items:
            if isinstance(item, Comment):
                self._out.append(encode_comment(item.text))
                continue
            if item.data is None:
                # Not an event for listeners (e.g. retry only): never numbered, and carried
                # with the next event so that live and replayed bytes stay the same.
                self._carry.append(encode_event(None, event=item.event, retry=item.retry))
                continue
            if self._first_event_at is None:
                self._first_event_at = time.perf_counter()
                self._m.upstream_first_event.observe(
                    self._first_event_at - self._started, exemplar(self._span)
                )
            payload = parse_payload(item.data)
            meta: dict[str, str] | None = None
            tracker = self._tracker
            if tracker is None:
                tracker = self._start_tracker(detect(item, payload, self._hint))
                meta = {"dialect": tracker.dialect.value}
            for transition in tracker.observe(item, payload):
                self._m.stream_transitions.labels(transition.value).inc()
                if transition is not Transition.SAW_STOP_REASON:
                    self._span.add_event(transition.value, {"sse.seq": self._seq + 1})
            if tracker.meta:
                meta = self._tracker_meta(tracker, meta)
            if tracker.saw_done:
                final = tracker.finish()
                self._emit(item.data, item.event, item.retry, payload, meta=meta, final=final)
                return True
            self._emit(item.data, item.event, item.retry, payload, meta=meta)
        return False

    def _tracker_meta(
        self, tracker: DialectTracker, meta: dict[str, str] | None
    ) -> dict[str, str] | None:
        """The tracker's changed meta fields, written with the event that changed them."""
        changed = tracker.take_meta()
        if changed is None:
            return meta
        protocol_id = changed.get("protocol_id")
        if protocol_id is not None:
            self._writer.alias(self._stream, protocol_id)
        return {**meta, **changed} if meta else changed

    def _emit(
        self,
        data: str,
        event: str | None,
        retry: int | None,
        payload: Any,
        *,
        meta: dict[str, str] | None = None,
        final: Outcome | None = None,
    ) -> None:
        """Number, store and queue one event; ``final`` marks the run's last event."""
        self._seq += 1
        seq = self._seq
        raw = render_event(
            data,
            event=event,
            retry=retry,
            seq=seq,
            run_id=self._run_id,
            fill=self._fill,
            payload=payload,
        )
        if self._carry:
            raw = b"".join(self._carry) + raw
            self._carry.clear()
        if final is not None:
            meta = {**(meta or {}), **final_meta(final)}
        self._writer.append(self._stream, seq, raw, complete=final is not None, meta=meta)
        self._bytes += len(raw)
        self._out.append(raw)

    def _flush_client(self) -> None:
        # Counted per upstream chunk, not per event: a metric update takes a lock.
        if (events := self._seq - self._counted_events) > 0:
            self._m.stream_events.inc(events)
            self._m.stream_bytes.inc(self._bytes - self._counted_bytes)
            self._counted_events, self._counted_bytes = self._seq, self._bytes
        if not self._out:
            return
        out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        if self._client is not None:
            self._client.send(out)
            self._sent_at = self._loop.time()

    def keepalive(self, now: float, interval: float) -> None:
        """Called about every second: when the client got nothing for ``interval`` seconds (the
        upstream is silent: a model thinking, or one that stalled after an error event), send a
        comment, so that proxies and load balancers between the client and the sidecar do not
        close an idle stream. Comments are neither stored nor numbered.

        And the upstream's read timeout: a silence longer than ``upstream_read_timeout_seconds``
        ends the run (``upstream_timeout``). Checked here rather than by aiohttp's ``sock_read``
        timer, which is cancelled and armed again on every read (a timer per chunk of every
        stream); the proxy turns that timer off once a response is teed."""
        pacer = self._pacer
        # A read the pacer held is no silence of the upstream's.
        if not pacer.holding and now - max(self._read_at, pacer.released_at) >= self._read_timeout:
            self.cancel(EndCause.UPSTREAM_TIMEOUT, READ_TIMEOUT_DETAIL)
        if self._client is not None and now - self._sent_at >= interval:
            self._client.send(KEEPALIVE)
            self._sent_at = now

    async def _finish(self, cause: EndCause | None, detail: str | None) -> None:
        # When the upstream's own terminal came, the outcome exists already and synthesizes
        # nothing.
        tracker = self._tracker
        if tracker is None:  # no data event came: the path's usual protocol, else generic
            tracker = self._start_tracker(self._hint or Dialect.GENERIC)
        if (cause is None or cause is EndCause.EOF) and self._decoder.buffered_bytes:
            tracker.partial_event = True
            detail = detail or "the upstream closed the stream inside an event"
        outcome = tracker.finish(cause or EndCause.EOF, detail)
        self.outcome = outcome
        last = len(outcome.synthesized) - 1
        for i, synth in enumerate(outcome.synthesized):
            self._emit_synthesized(synth, final=outcome if i == last else None)
        self._flush_client()
        self._m.runs_active.dec()
        self._span.set_attributes({"sse.events": self._seq, "sse.bytes": self._bytes})
        record_end(
            self._m,
            outcome,
            run_id=self._run_id,
            duration=time.perf_counter() - self._started,
            span=self._span,
            detail=detail,
        )
        self._span.end()

    def _emit_synthesized(self, synth: Synthesized, *, final: Outcome | None) -> None:
        if synth.data is not None:
            self._emit(synth.data, synth.event, None, None, final=final)
            return
        # An end with no bytes: stored so that replay readers know the run ended; no client
        # gets anything.
        self._seq += 1
        meta = final_meta(final) if final is not None else None
        self._writer.append(self._stream, self._seq, b"", complete=final is not None, meta=meta)


def _take_buffered(content: aiohttp.StreamReader) -> bytes:
    """Bytes a failed StreamReader still holds (aiohttp keeps them in the private _buffer)."""
    buffer = getattr(content, "_buffer", None)
    if not buffer:
        return b""
    data = b"".join(buffer)
    buffer.clear()
    return data
