"""The group-commit writer: every run's events reach Redis in order, once, in few round trips.

One task per process owns the Redis writes. An idle writer sends a run's first event at once;
while a round trip is in flight, new events of all runs gather and go in the next one (at most
``flush_max_events`` per trip). So latency stays low at low load and batches grow with load, with
no fixed timer. Each run's batch is one call of ``append.lua``: events and meta land atomically,
and a batch retried after a lost reply is deduplicated by seq, so retries never duplicate.

Failures: connection errors are retried with capped exponential backoff for as long as it takes
(events stay buffered, in order); the buffered bytes are bounded by ``max_bytes``, past which new
events of the run that hit the bound are dropped, counted, and the run is marked incomplete in its
meta so that readers get an explicit error instead of a silent hole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode, Tracer
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.background import Background
from sidecar.errors import RunConflict, RunExists
from sidecar.keys import Keys, RunId
from sidecar.telemetry import Metrics
from sidecar.tracing import exemplar

log = logging.getLogger(__name__)

APPEND_SCRIPT = resources.files("sidecar").joinpath("append.lua").read_text()
APPEND_SHA = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest()
# Replies that mean the run can never be written again (another producer owns it, or its seq
# numbers are broken); later meta updates of such a run are ignored too.
_FATAL = {-1: "conflict", -2: "fenced", -3: "gap", -4: "conflict"}

# Per-run script failures that are not connection errors (e.g. OOM) are retried this many times
# before the run's buffered events are dropped, so one poisoned key cannot block the rest forever.
MAX_SCRIPT_FAILURES = 8
BACKOFF_START = 0.05
BACKOFF_MAX = 2.0


@dataclass(slots=True)
class Pending:
    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool
    # Meta fields set with (or after) this event: written in the same round trip as the event,
    # never earlier, so the meta always agrees with the stored events.
    meta: dict[str, str] | None = None


@dataclass(eq=False, slots=True)
class RunStream:
    """The writer's view of one run, created by ``Writer.open``; dropped once fully written."""

    run_id: RunId
    producer: str
    stream_key: str
    meta_key: str
    claimed: bool = False
    events: deque[Pending] = field(default_factory=deque)
    meta: dict[str, str] = field(default_factory=dict)  # fields newer than no pending event
    inflight: int = 0  # events at the head of ``events`` that a round trip is carrying now
    written_seq: int = 0  # the last seq Redis confirmed
    span_context: SpanContext | None = None  # the run's sse.run span, for flush span links
    pending_bytes: int = 0
    replace: bool = True  # may the claim replace a finished run stored under this id?
    replaced: bool = False  # the claim did replace one
    dropped: str | None = None  # why this run's events are no longer stored, once they are not
    fenced: bool = False  # nothing of this run can be written any more, meta included
    failures: int = 0


class Writer:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        metrics: Metrics,
        *,
        flush_max_events: int = 512,
        max_bytes: int = 64 << 20,
        ttl_seconds: int = 10800,
        max_stream_events: int = 100000,
        lease_seconds: float = 30.0,
        command_timeout: float = 2.0,
        tracer: Tracer | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._m = metrics
        self._max_events = flush_max_events
        self._max_bytes = max_bytes
        self._ttl_ms = str(ttl_seconds * 1000)
        self._maxlen = str(max_stream_events)
        self._lease_ms = str(int(lease_seconds * 1000))
        self._timeout = command_timeout
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._dirty: OrderedDict[RunStream, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending_events = 0
        self._pending_bytes = 0
        self._background = Background("sse-writer", self._loop)
        self._backoff = BACKOFF_START
        # Read at scrape time: setting a gauge on every append would take a lock per event.
        metrics.writer_pending_events.set_function(lambda: self._pending_events)
        metrics.writer_pending_bytes.set_function(lambda: self._pending_bytes)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._background.start()

    async def close(self, timeout: float) -> bool:
        """Flush what is buffered within ``timeout`` seconds, then stop; True if all was written."""
        flushed = await self.flush(timeout)
        await self._background.stop()
        if not flushed:
            lost = self._pending_events
            log.error("writer stopped with %d events unwritten", lost, extra={"lost_events": lost})
            self._m.writer_dropped_events.labels("shutdown").inc(lost)
            for run in list(self._dirty):
                self._discard(run, "shutdown", count=False)
        return flushed

    async def flush(self, timeout: float) -> bool:
        """Wait until everything accepted so far is written; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    # -- producer API ------------------------------------------------------------------------

    async def open(
        self,
        run_id: RunId,
        producer: str,
        meta: Mapping[str, str],
        span_context: SpanContext | None = None,
        *,
        replace: bool = True,
    ) -> RunStream:
        """Claim ``run_id`` for ``producer`` and write its initial meta in one round trip.

        Raises ``RunConflict`` when another producer holds a live lease on the run, and
        ``RunExists`` when ``replace`` is false and a run is stored under the id. When Redis
        cannot be reached the run is still opened: the claim travels with its first write, so a
        Redis outage never blocks the live stream.
        """
        run = RunStream(
            run_id,
            producer,
            self._keys.stream(run_id),
            self._keys.meta(run_id),
            span_context=span_context,
            replace=replace,
        )
        try:
            reply = await asyncio.wait_for(
                self._call_script(run, claim=True, meta=meta, events=()), self._timeout
            )
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            self._m.redis_errors.labels("claim").inc()
            log.warning(
                "cannot claim run in Redis, continuing and retrying in the writer: %s",
                exc,
                extra={"run_id": run_id},
            )
            run.meta.update(meta)
            self._mark_dirty(run)
            return run
        code = int(reply[0])
        if code == -1:
            raise RunConflict(run_id, redis_text(reply[1]))
        if code == -4:
            raise RunExists(run_id)
        if code != 0:
            raise RuntimeError(f"unexpected claim reply {reply!r}")
        run.claimed = True
        run.replaced = int(reply[4]) == 1
        return run

    def append(
        self,
        run: RunStream,
        seq: int,
        data: bytes,
        *,
        complete: bool = False,
        meta: Mapping[str, str] | None = None,
        timestamp_ms: int | None = None,
    ) -> bool:
        """Queue one event (and meta fields to set with it); False if it will not be stored."""
        if run.fenced:
            self._m.writer_dropped_events.labels(run.dropped or "fenced").inc()
            return False
        if run.dropped is None and self._pending_bytes + len(data) > self._max_bytes:
            self._start_dropping(run, "overflow", seq)
        if run.dropped is not None:
            # The event is lost, but what it says about the run (e.g. its final status) is not.
            self._m.writer_dropped_events.labels(run.dropped).inc()
            if meta:
                self._add_meta(run, meta)
                self._mark_dirty(run)
            return False
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        run.events.append(Pending(seq, data, ts, complete, dict(meta) if meta else None))
        run.pending_bytes += len(data)
        self._pending_events += 1
        self._pending_bytes += len(data)
        self._mark_dirty(run)
        return True

    def update_meta(self, run: RunStream, meta: Mapping[str, str]) -> None:
        """Set meta fields; an empty mapping just renews the producer's lease and the TTL."""
        if run.fenced:
            return
        if meta:
            self._add_meta(run, meta)
        self._mark_dirty(run)

    # -- internals ---------------------------------------------------------------------------

    def _add_meta(self, run: RunStream, meta: Mapping[str, str]) -> None:
        """Attach meta to the newest event not yet in flight, so it lands with (not before) it."""
        if len(run.events) > run.inflight:
            last = run.events[-1]
            last.meta = {**last.meta, **meta} if last.meta else dict(meta)
        else:
            run.meta.update(meta)

    def _start_dropping(self, run: RunStream, reason: str, seq: int) -> None:
        run.dropped = reason
        self._add_meta(run, {"incomplete": reason, "dropped_from_seq": str(seq)})
        log.error(
            "run %s: dropping events from seq %d on (%s); replay will report the gap",
            run.run_id,
            seq,
            reason,
            extra={"run_id": run.run_id, "reason": reason},
        )

    def _mark_dirty(self, run: RunStream) -> None:
        if run not in self._dirty:
            self._dirty[run] = None
        self._idle.clear()
        self._wake.set()

    def _discard(self, run: RunStream, reason: str, *, count: bool = True) -> None:
        """Give up on a run's buffered events (they can never be written)."""
        n = len(run.events)
        if count and n:
            self._m.writer_dropped_events.labels(reason).inc(n)
        self._pending_events -= n
        self._pending_bytes -= run.pending_bytes
        run.events.clear()
        run.inflight = 0
        run.pending_bytes = 0
        run.meta.clear()
        run.dropped = run.dropped or reason
        self._dirty.pop(run, None)
        self._after_change()

    def _after_change(self) -> None:
        if not self._dirty:
            self._idle.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                if await self._round():
                    self._backoff = BACKOFF_START
                else:
                    # Jittered so that many sidecars do not hammer a recovering Redis in step.
                    await asyncio.sleep(self._backoff * (0.5 + random.random() / 2))
                    self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    async def _round(self) -> bool:
        """One round trip for as many runs as fit; True unless something has to be retried."""
        # (run, events carried, standalone meta sent): a run with no events and no meta is a
        # lease renewal, which the script performs on every call.
        batch: list[tuple[RunStream, int, dict[str, str]]] = []
        budget = self._max_events
        for run in self._dirty:
            n = min(len(run.events), budget)
            run.inflight = n
            batch.append((run, n, dict(run.meta)))
            budget -= n
            if budget <= 0:
                break
        n_events = sum(n for _, n, _ in batch)
        links = [Link(run.span_context) for run, _, _ in batch if run.span_context is not None]
        with self._tracer.start_as_current_span(
            "sse.flush",
            kind=SpanKind.CLIENT,
            links=links,
            attributes={"sse.flush.events": n_events, "sse.flush.runs": len(batch)},
        ) as span:
            outcome = await self._send(batch, span)
            span.set_attribute("sse.flush.outcome", outcome)
            if outcome != "ok":
                span.set_status(StatusCode.ERROR)
        self._m.flushes.labels("ok" if outcome == "ok" else "error").inc()
        if outcome == "ok":
            return True
        if outcome == "noscript":
            # Redis restarted (or SCRIPT FLUSH): load the script, then retry at once.
            try:
                await self._redis.script_load(APPEND_SCRIPT)
            except (redis_errors.RedisError, OSError):
                return False
            return True
        return False

    async def _send(self, batch: list[tuple[RunStream, int, dict[str, str]]], span: Span) -> str:
        """The round trip itself; its outcome: ok, noscript, error (retry after backoff)."""
        started = time.perf_counter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for run, n, standalone in batch:
                    events = list(islice(run.events, n))
                    meta = dict(standalone)
                    for ev in events:
                        if ev.meta:
                            meta.update(ev.meta)
                    self._queue_script(pipe, run, meta, events)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (redis_errors.RedisError, OSError) as exc:
            for run, _, _ in batch:
                run.inflight = 0
            self._m.redis_errors.labels("flush").inc()
            span.record_exception(exc)
            log.warning("writer round trip failed, will retry: %s", exc)
            return "error"
        self._m.flush_duration.observe(time.perf_counter() - started, exemplar(span))
        self._m.flush_batch_events.observe(sum(n for _, n, _ in batch))
        outcome = "ok"
        for (run, n, meta), reply in zip(batch, replies, strict=True):
            if isinstance(reply, redis_errors.NoScriptError):
                run.inflight = 0
                outcome = "noscript" if outcome == "ok" else outcome
            elif isinstance(reply, Exception):
                run.inflight = 0
                outcome = "error"
                self._script_failed(run, reply)
            else:
                self._settle(run, n, meta, reply)
        self._after_change()
        return outcome

    def _settle(self, run: RunStream, n: int, standalone: dict[str, str], reply: Any) -> None:
        code = int(reply[0])
        run.inflight = 0
        if code == 0:
            run.claimed = True
            run.failures = 0
            run.written_seq = int(reply[3])
            for _ in range(n):
                ev = run.events.popleft()
                run.pending_bytes -= len(ev.data)
                self._pending_bytes -= len(ev.data)
            self._pending_events -= n
            trimmed = int(reply[2])
            if trimmed:
                self._m.stream_trimmed_events.inc(trimmed)
            for key, value in standalone.items():
                if run.meta.get(key) == value:
                    del run.meta[key]
            if not run.events and not run.meta:
                self._dirty.pop(run, None)
            return
        holder = redis_text(reply[1])
        reason = _FATAL.get(code, "redis_rejected")
        log.error(
            "run %s: Redis refused the write (%s, holder/last %s); its events are dropped",
            run.run_id,
            reason,
            holder,
            extra={"run_id": run.run_id, "reason": reason},
        )
        run.fenced = True
        self._discard(run, reason)

    def _script_failed(self, run: RunStream, exc: Exception) -> None:
        run.failures += 1
        self._m.redis_errors.labels("append").inc()
        log.warning(
            "run %s: append failed (%d/%d): %s",
            run.run_id,
            run.failures,
            MAX_SCRIPT_FAILURES,
            exc,
            extra={"run_id": run.run_id},
        )
        if run.failures >= MAX_SCRIPT_FAILURES:
            self._discard(run, "redis_rejected")

    def _args(
        self, run: RunStream, claim: bool, meta: Mapping[str, str], events: Sequence[Pending]
    ) -> list[Any]:
        args: list[Any] = [
            run.producer,
            ("1" if run.replace else "2") if claim else "0",
            self._lease_ms,
            self._ttl_ms,
            self._maxlen,
            run.written_seq,
            len(meta),
        ]
        for key, value in meta.items():
            args.append(key)
            args.append(value)
        for ev in events:
            args.append(ev.seq)
            args.append(ev.data)
            args.append(ev.timestamp_ms)
            args.append("true" if ev.complete else "false")
        return args

    def _queue_script(
        self, pipe: Any, run: RunStream, meta: Mapping[str, str], events: Sequence[Pending]
    ) -> None:
        args = self._args(run, not run.claimed, meta, events)
        pipe.execute_command("EVALSHA", APPEND_SHA, 2, run.stream_key, run.meta_key, *args)

    async def _call_script(
        self, run: RunStream, *, claim: bool, meta: Mapping[str, str], events: Sequence[Pending]
    ) -> Any:
        cmd = (
            "EVALSHA",
            APPEND_SHA,
            2,
            run.stream_key,
            run.meta_key,
            *self._args(run, claim, meta, events),
        )
        try:
            return await self._redis.execute_command(*cmd)  # type: ignore[no-untyped-call]
        except redis_errors.NoScriptError:
            await self._redis.script_load(APPEND_SCRIPT)
        return await self._redis.execute_command(*cmd)  # type: ignore[no-untyped-call]


def redis_text(value: Any) -> str:
    """A Redis reply value as text (replies are bytes unless decode_responses is set)."""
    return value.decode() if isinstance(value, bytes) else str(value)
