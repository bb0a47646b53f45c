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
from typing import Any

import aiohttp
import orjson
from opentelemetry.trace import Span, StatusCode

from sidecar.client_out import LiveClient
from sidecar.config import Settings
from sidecar.errors import CorruptEncoding, DecompressedTooLarge, EventTooLarge
from sidecar.inflate import Inflater
from sidecar.keys import RunId
from sidecar.payload import parse_payload, render_event
from sidecar.runs import RunRegistry, final_meta
from sidecar.sse import Comment, Event, SSEDecoder, encode_comment, encode_event
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause, Outcome, Status, Tracker, Transition, is_done
from sidecar.tracing import exemplar
from sidecar.writer import RunStream, Writer

log = logging.getLogger(__name__)

# After [DONE] the upstream normally ends its response at once; what it sends past [DONE] is
# read and dropped, within these bounds, before the connection is given back.
UPSTREAM_SETTLE_SECONDS = 1.0
UPSTREAM_SETTLE_BYTES = 64 << 10


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
    ) -> None:
        self._run_id = run_id
        self._generation = generation
        self._span = span
        self._bytes = 0
        self._counted_events = 0
        self._counted_bytes = 0
        self._stream = stream
        self._writer = writer
        self._runs = runs
        self._m = metrics
        self._upstream = upstream
        self._inflater = inflater
        self._started = started
        self._cancel_on_disconnect = settings.on_client_disconnect == "cancel"
        self._decoder = SSEDecoder(settings.max_event_bytes)
        self._tracker = Tracker(default_status=Status(settings.status_without_stop_reason))
        self._fill = settings.dialect == "letta"
        self._client: LiveClient | None = None
        self._seq = 0
        self._first_event_at: float | None = None
        self._cancel_cause: EndCause | None = None
        self._client_left = False
        self._out: list[bytes] = []
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

    def cancel(self, cause: EndCause) -> None:
        """End the run early with ``cause``'s terminal (cancel API, shutdown, client policy)."""
        if self._cancel_cause is not None or (self.task is not None and self.task.done()):
            return
        self._cancel_cause = cause
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
        detail: str | None = None
        try:
            if cause is None:
                cause, detail = await self._pump()
        except asyncio.CancelledError:
            if self._cancel_cause is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            cause = self._cancel_cause
        if cause is not None:
            # Cancelled or failed: closing the connection is what tells the upstream to stop.
            self._upstream.close()
        await self._finish(cause, detail)
        self._runs.remove(self)
        if self._client is not None:
            self._client.end()
        self.ended.set_result(None)
        return cause

    async def _settle_upstream(self) -> None:
        """After [DONE]: let the upstream end its response, so it sees a clean finish (not a
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
        """Read the upstream until [DONE] (cause None) or until it ends some other way."""
        content = self._upstream.content
        try:
            async for chunk in content.iter_any():
                if (end := await self._take(chunk)) is not None:
                    return end
        except TimeoutError:
            return EndCause.UPSTREAM_TIMEOUT, "no data from the upstream within the read timeout"
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
        """Number, store and queue for the client each item; True once [DONE] went through."""
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
            for transition in self._tracker.observe(item, payload):
                self._m.stream_transitions.labels(transition.value).inc()
                if transition is not Transition.SAW_STOP_REASON:
                    self._span.add_event(transition.value, {"sse.seq": self._seq + 1})
                meta = meta or {}
                if transition == "saw_stop_reason" and self._tracker.stop_reason is not None:
                    meta["stop_reason"] = self._tracker.stop_reason
                elif transition == "saw_error":
                    meta["error"] = orjson.dumps(self._tracker.error).decode()
            if is_done(item):
                final = self._tracker.finish()
                self._emit(item.data, item.event, item.retry, payload, meta=meta, final=final)
                return True
            self._emit(item.data, item.event, item.retry, payload, meta=meta)
        return False

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
        """Number, store and queue one event; ``final`` marks the run's last event ([DONE])."""
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

    async def _finish(self, cause: EndCause | None, detail: str | None) -> None:
        # When the upstream's [DONE] came, the outcome exists already and synthesizes nothing.
        outcome = self._tracker.finish(cause or EndCause.EOF, detail)
        self.outcome = outcome
        last = len(outcome.synthesized) - 1
        for i, synth in enumerate(outcome.synthesized):
            self._emit(synth.data, synth.event, None, None, final=outcome if i == last else None)
        self._flush_client()
        self._m.runs_active.dec()
        self._m.runs_finished.labels(outcome.status.value, outcome.stop_reason_label).inc()
        self._m.run_duration.labels(outcome.status.value).observe(
            time.perf_counter() - self._started, exemplar(self._span)
        )
        self._span.set_attributes(
            {
                "sse.status": outcome.status.value,
                "sse.stop_reason": outcome.stop_reason or "",
                "sse.events": self._seq,
                "sse.bytes": self._bytes,
                "sse.forced_done": outcome.forced_done.value if outcome.forced_done else "",
            }
        )
        if outcome.status is Status.FAILED:
            self._span.set_status(StatusCode.ERROR, f"run {outcome.status.value}")
        if outcome.forced_done is None:
            log.debug("run finished: %s", outcome.status.value, extra={"run_id": self._run_id})
            self._span.end()
            return
        self._m.forced_done.labels(outcome.forced_done.value).inc()
        self._span.add_event(
            "forced_done",
            {"sse.reason": outcome.forced_done.value, "sse.detail": detail or ""},
        )
        self._span.end()
        log.warning(
            "run ended without the upstream's [DONE]: forced %s",
            outcome.forced_done.value,
            extra={
                "run_id": self._run_id,
                "reason": outcome.forced_done.value,
                "saw_error": outcome.saw_error,
                "saw_done": outcome.saw_done,
                "detail": detail,
            },
        )


def _take_buffered(content: aiohttp.StreamReader) -> bytes:
    """Bytes a failed StreamReader still holds (aiohttp keeps them in the private _buffer)."""
    buffer = getattr(content, "_buffer", None)
    if not buffer:
        return b""
    data = b"".join(buffer)
    buffer.clear()
    return data
