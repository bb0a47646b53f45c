"""The group-commit writer: every run's events reach Redis in order, once, in few round trips.

One task per process owns the writes. A round trip waits ``flush_gather_seconds`` (2 ms) for
events of other runs to go with the first one, and while a round trip is in flight new events of
all runs gather and go in the next one (at most ``flush_max_events`` per trip; a full batch, and
a claim or lease renewal, does not wait). So batches grow with load, and at light load a round
trip is not spent on each event: at 100 streams x 20 events/s the writer made a round trip every
third event and was a fifth of the process's CPU (py-spy); the wait costs a replay reader at
most those 2 ms, the live client nothing. Each run's batch is one call of the store's append
script: events and meta land atomically, and a batch retried after a lost reply is deduplicated
by seq.

Under a backlog, a second round trip goes out while the first is in flight (``_overlap``): it
carries events of runs the first does not, so each run's events still reach Redis in order,
one round trip at a time; the claims, renewals, lease index and aliases stay in the first
lane, in order. At 1,000 streams with a reader on each, one round trip of ~480 events took
45 ms (packing, Redis' script calls, and the turns of a busy event loop its reply waited for,
in series), the writer was in a round trip 90 % of the time and stored less than the tee
relayed, so replay lag grew through a long run.

Claims and lease renewals never queue behind a backlog: every round trip carries all of them
first, whatever the event budget, so a run's lease is renewed as soon as Redis answers again
after an outage, before the orphan sweep of any replica could judge it.

Failures: connection errors are retried with capped exponential backoff for as long as it takes
(events stay buffered, in order). The buffered bytes are bounded by ``max_bytes``: an event that
does not fit is dropped and counted, and the run is stored again once the backlog is under
three quarters of the bound, its meta recording the lost seq ranges so that replays say where
the holes are. A run's last event (its terminal) is never dropped, so every stored run ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode, Tracer

from sidecar.background import Background
from sidecar.errors import InvalidRunId, RunConflict, RunExists, StoreError
from sidecar.keys import RunId, validate_run_id
from sidecar.pace import Pacer
from sidecar.store import AppendOp, AppendResult, AppendStatus, Pending, RunStore, backoff
from sidecar.store import meta as fields
from sidecar.telemetry import Metrics
from sidecar.tracing import exemplar

log = logging.getLogger(__name__)


class StoredFeed(Protocol):
    """Told what the writer stored (the live tail serves this process's runs from it)."""

    def stored(self, run_id: RunId, events: Sequence[Pending]) -> None:
        """Redis confirmed these events of the run, in seq order."""
        ...

    def abandoned(self, run_id: RunId) -> None:
        """The writer gave the run up: nothing more of it will be stored."""
        ...


# Per-run script failures that are not connection errors (e.g. OOM) are retried this many times
# before the run's buffered events are dropped, so one poisoned key cannot block the rest forever.
MAX_SCRIPT_FAILURES = 8
BACKOFF_START = 0.05
BACKOFF_MAX = 2.0
# A run that overflowed is stored again once the backlog is under this share of the bound (not
# at the first byte of room, which would punch a hole every other event).
RESUME_SHARE = 0.75
# After this many holes a run stays unstored (but for its terminal): its lost ranges stay short.
MAX_HOLES = 64
# Claims and renewals one round trip carries at most (the rest go in the next one).
MAX_URGENT = 4096
# The second lane sends while the first is in flight once this share of a full batch waits
# unsent (a full batch: ``flush_max_events``): at light load the first lane's gather batches.
OVERLAP_SHARE = 4


@dataclass(eq=False, slots=True)
class RunStream:
    """The writer's view of one run, created by ``Writer.open``."""

    run_id: RunId
    producer: str
    initial: dict[str, str]  # the meta the run started with (sent again if Redis loses it)
    claimed: bool = False
    # Resolved once Redis answered the claim: True, or why it refused it (the producer holding
    # the run, or a stored run the claim may not replace).
    claim: asyncio.Future[Literal[True] | RunConflict | RunExists] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    replace: bool = True  # may the claim replace a finished run stored under this id?
    replaced: bool = False  # the claim did replace one (a new generation of the run id)
    events: deque[Pending] = field(default_factory=deque)
    meta: dict[str, str] = field(default_factory=dict)  # fields newer than no pending event
    inflight: int = 0  # events at the head of ``events`` that a round trip is carrying now
    flying: bool = False  # a round trip is carrying the run (events, meta, or its claim)
    written_seq: int = 0  # the last seq Redis confirmed
    span_context: SpanContext | None = None  # the run's sse.run span, for flush span links
    pending_bytes: int = 0
    dropping: bool = False  # events do not fit the backlog bound: they are being dropped
    holes: int = 0
    resumed: set[int] = field(default_factory=set)  # first seqs stored after an unwritten hole
    fenced: str | None = None  # why nothing of this run can be written any more
    urgent: bool = False  # a claim, renewal or rebuild waits to be sent
    failures: int = 0
    history_lost: bool = False
    # Set once the run's last event is in Redis (or will never be: the run was discarded).
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Writer:
    def __init__(
        self,
        store: RunStore,
        metrics: Metrics,
        *,
        flush_max_events: int = 512,
        gather_seconds: float = 0.0,
        max_bytes: int = 64 << 20,
        ttl_seconds: int = 10800,
        max_stream_events: int = 100000,
        lease_seconds: float = 30.0,
        pace_bytes: int = 0,
        cpu_capacity: float = 1.0,
        tracer: Tracer | None = None,
    ) -> None:
        self._store = store
        self._m = metrics
        self._max_events = flush_max_events
        self._gather = gather_seconds
        self._max_bytes = max_bytes
        self._resume_bytes = int(max_bytes * RESUME_SHARE)
        self._ttl_ms = ttl_seconds * 1000
        self._maxlen = max_stream_events
        self._lease_ms = int(lease_seconds * 1000)
        self._tracer = tracer if tracer is not None else trace.NoOpTracer()
        # Without tracing a flush's span links are built for nothing (a Link per run per round
        # trip: 2.8 % of the samples at 1,000 streams with readers).
        self._links = not isinstance(self._tracer, trace.NoOpTracer)
        self._dirty: OrderedDict[RunStream, None] = OrderedDict()
        self._urgent: OrderedDict[RunStream, None] = OrderedDict()
        self._leases: dict[RunId, int] = {}  # lease index additions for the next round trip
        self._ended: set[RunId] = set()  # lease index removals for the next round trip
        self._aliases: dict[RunId, RunId] = {}  # protocol id -> run id, for the next round trip
        self._wake = asyncio.Event()
        self._overlap = asyncio.Event()  # wakes the second lane
        self._landed = asyncio.Event()  # a second-lane round trip came back
        # The first lane's round trip is in flight, and the second lane may find something to
        # send meanwhile (not once it found every waiting run carried: then each append would
        # wake it for nothing).
        self._armed = False
        self._flying_events = 0  # events the round trips in flight carry
        self._flying_runs = 0
        self._overlap_min = max(1, flush_max_events // OVERLAP_SHARE)
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending_events = 0
        self._pending_bytes = 0
        self._background = Background("sse-writer", self._lanes, metrics)
        self._backoff = backoff(BACKOFF_START, BACKOFF_MAX)
        self._failed_rounds = 0
        self._feed: StoredFeed | None = None
        # Loop time of the last round trip Redis answered (the pacer's sign that it answers).
        self._landed_at = -math.inf
        self.pacer = Pacer(
            metrics,
            pace_bytes=pace_bytes,
            backlog=lambda: self._pending_bytes,
            landed_at=lambda: self._landed_at,
            answering=lambda: not store.health.down,
            capacity=cpu_capacity,
        )
        # Read at scrape time: setting a gauge on every append would take a lock per event.
        metrics.writer_pending_events.set_function(lambda: self._pending_events)
        metrics.writer_pending_bytes.set_function(lambda: self._pending_bytes)

    # -- lifecycle ---------------------------------------------------------------------------

    def feed(self, feed: StoredFeed | None) -> None:
        """Report what is stored, from now on, to ``feed`` (None: to nobody)."""
        self._feed = feed

    def start(self) -> None:
        self._background.start()
        self.pacer.start()

    async def close(self, timeout: float) -> bool:
        """Flush what is buffered within ``timeout`` seconds, then stop; True if all was written."""
        # The tees are not held while the rest is flushed (shutdown ends them meanwhile).
        await self.pacer.stop()
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

    @property
    def store_down(self) -> bool:
        """Whether the last command the process sent to Redis failed."""
        return self._store.health.down

    # -- producer API ------------------------------------------------------------------------

    def open(
        self,
        run_id: RunId,
        producer: str,
        meta: Mapping[str, str],
        span_context: SpanContext | None = None,
        *,
        replace: bool = True,
    ) -> RunStream:
        """Start ``run_id`` for ``producer``: its claim and initial meta go in the next round trip.

        Never waits on Redis: ``run.claim`` resolves when Redis answered (True, or why it
        refused: another producer holds the run, or, with ``replace`` false, a run is stored
        under the id). Until then, and whatever the answer, events can be appended; a run whose
        claim was refused is fenced and stores nothing.
        """
        run = RunStream(run_id, producer, dict(meta), span_context=span_context, replace=replace)
        run.meta.update(meta)
        self._leases[run_id] = self._deadline()
        self._mark_urgent(run)
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
        if run.fenced is not None:
            self._m.writer_dropped_events.labels(run.fenced).inc()
            return False
        size = len(data)
        # The terminal is always stored (replay readers end at it); the bound may be exceeded
        # by that one event per run.
        if not complete and self._overflows(run, seq, size):
            self._m.writer_dropped_events.labels("overflow").inc()
            if meta:
                # The event is lost, but what it says about the run (e.g. its status) is not.
                self._add_meta(run, meta)
                self._mark_dirty(run)
            return False
        if run.dropping:
            self._resume(run, seq)
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        run.events.append(Pending(seq, data, ts, complete, dict(meta) if meta else None))
        run.pending_bytes += size
        self._pending_events += 1
        self._pending_bytes += size
        self._mark_dirty(run)
        if self._armed and self._pending_events - self._flying_events >= self._overlap_min:
            self._overlap.set()
        return True

    def update_meta(self, run: RunStream, meta: Mapping[str, str]) -> None:
        """Set meta fields, written with the run's newest pending event (or alone)."""
        if run.fenced is not None or not meta:
            return
        self._add_meta(run, meta)
        self._mark_dirty(run)

    def alias(self, run: RunStream, protocol_id: str) -> None:
        """Record that the run's protocol calls it ``protocol_id`` (``resp_...``, ``msg_...``):
        written with the next round trip, so the run can be looked up by that id too."""
        if protocol_id == run.run_id or run.fenced is not None:
            return
        try:
            # Protocol ids go into a key: the run-id rules keep them safe there.
            alias = validate_run_id(protocol_id)
        except InvalidRunId:
            log.debug("not recording the protocol id %r: not a valid key part", protocol_id[:80])
            return
        self._aliases[alias] = run.run_id
        self._idle.clear()
        self._wake.set()

    def renew(self, runs: Iterable[RunStream], *, resend_initial: bool = False) -> None:
        """Renew these runs' leases in the next round trip, ahead of any backlog.

        ``resend_initial``: Redis lost its data; write the runs' initial meta again too (the
        append script rebuilds a vanished meta, marking the lost history).
        """
        deadline = self._deadline()
        for run in runs:
            if run.fenced is not None:
                continue
            self._leases[run.run_id] = deadline
            if resend_initial:
                initial = {k: v for k, v in run.initial.items() if k != fields.STATUS}
                self._add_meta(run, initial)
            self._mark_urgent(run)

    # -- internals ---------------------------------------------------------------------------

    def _deadline(self) -> int:
        return int(time.time() * 1000) + self._lease_ms

    def _overflows(self, run: RunStream, seq: int, size: int) -> bool:
        """Whether this event must be dropped; starts (and logs) a run's dropping."""
        if run.dropping:
            return run.holes >= MAX_HOLES or self._pending_bytes + size > self._resume_bytes
        if self._pending_bytes + size <= self._max_bytes:
            return False
        run.dropping = True
        if run.holes == 0:
            self._add_meta(run, {fields.INCOMPLETE: fields.OVERFLOW})
            log.error(
                "run %s: the writer backlog is over writer_max_bytes; dropping its events from "
                "seq %d until there is room (the lost seqs are recorded; replays report them)",
                run.run_id,
                seq,
                extra={"run_id": run.run_id, "reason": "overflow", "seq": seq},
            )
        return True

    def _resume(self, run: RunStream, seq: int) -> None:
        run.dropping = False
        run.holes += 1
        run.resumed.add(seq)
        log.info(
            "run %s: stored again from seq %d after a hole",
            run.run_id,
            seq,
            extra={"run_id": run.run_id, "seq": seq},
        )

    def _add_meta(self, run: RunStream, meta: Mapping[str, str]) -> None:
        """Attach meta to the newest event not yet in flight, so it lands with (not before) it."""
        if len(run.events) > run.inflight:
            last = run.events[-1]
            last.meta = {**last.meta, **meta} if last.meta else dict(meta)
        else:
            run.meta.update(meta)

    def _mark_dirty(self, run: RunStream) -> None:
        if run not in self._dirty:
            self._dirty[run] = None
        self._idle.clear()
        self._wake.set()

    def _mark_urgent(self, run: RunStream) -> None:
        run.urgent = True
        self._urgent[run] = None
        self._mark_dirty(run)

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
        run.fenced = run.fenced or reason
        run.urgent = False
        self._dirty.pop(run, None)
        self._urgent.pop(run, None)
        self._leases.pop(run.run_id, None)
        run.ended.set()
        if self._feed is not None:
            self._feed.abandoned(run.run_id)
        self._after_change()

    def _after_change(self) -> None:
        if not self._dirty and not self._leases and not self._ended and not self._aliases:
            self._idle.set()

    async def _lanes(self) -> None:
        """The writer's body: the first lane runs here, the second in a task of its own.

        Not a TaskGroup: a cancellation the body swallowed (Background redelivers it, see
        there) would reach the group, not the lane; here it reaches the first lane itself. A
        failure of the second lane fails the body (and the supervisor restarts both)."""
        # A crash (Background restarts this) may have left runs marked as carried.
        for run in self._dirty:
            run.inflight, run.flying = 0, False
        self._flying_events = self._flying_runs = 0
        self._armed = False
        second = asyncio.create_task(self._overlap_loop(), name="sse-writer-second-lane")
        second.add_done_callback(self._second_lane_ended)
        try:
            await self._loop(second)
        finally:
            second.cancel()

    def _second_lane_ended(self, _task: asyncio.Task[None]) -> None:
        # Wakes the first lane wherever it waits (for work, or for the second lane's landing).
        self._wake.set()
        self._landed.set()

    def _unsent(self) -> int:
        return self._pending_events - self._flying_events

    def _sendable(self) -> bool:
        """Whether the first lane has something to send (not all of it carried by the other)."""
        return bool(
            self._leases or self._ended or self._aliases or len(self._dirty) > self._flying_runs
        )

    async def _loop(self, second: asyncio.Task[None]) -> None:
        """The first lane: everything, in order; round trips one after the other."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if second.done():
                # Its failure is the body's (it never ends otherwise).
                failure = None if second.cancelled() else second.exception()
                raise failure or RuntimeError("the writer's second lane ended")
            while self._dirty or self._leases or self._ended or self._aliases:
                if second.done():
                    self._wake.set()
                    break
                if not self._sendable():
                    # What is left is in the second lane's round trip.
                    self._landed.clear()
                    await self._landed.wait()
                    continue
                if self._gather and not self._urgent and self._unsent() < self._max_events:
                    # Claims and renewals do not wait: a new run's first events go at once.
                    await asyncio.sleep(self._gather)
                if await self._round(self._batch(overlap=False), overlap=False):
                    self._failed_rounds = 0
                else:
                    # Jittered so that many sidecars do not hammer a recovering Redis in step.
                    self._failed_rounds += 1
                    await asyncio.sleep(self._backoff(self._failed_rounds))

    async def _overlap_loop(self) -> None:
        """The second lane: while the first lane's round trip is in flight and a backlog of
        other runs' events waits, send those (nothing else; a failure is left to the first
        lane, which retries and backs off)."""
        while True:
            await self._overlap.wait()
            self._overlap.clear()
            while self._armed and self._unsent() >= self._overlap_min:
                batch = self._batch(overlap=True)
                if not batch:
                    # All that waits belongs to runs in flight.
                    self._armed = False
                    break
                ok = await self._round(batch, overlap=True)
                self._landed.set()
                if not ok:
                    break

    def _batch(self, overlap: bool) -> list[tuple[RunStream, int, dict[str, str]]]:
        """(run, events carried, standalone meta sent): urgent runs first, then by budget;
        none that a round trip in flight carries. The second lane takes no urgent run."""
        batch: list[tuple[RunStream, int, dict[str, str]]] = []
        budget = self._max_events
        if not overlap:
            for run in islice(self._urgent, MAX_URGENT):
                if run.flying:
                    continue
                n = min(len(run.events), max(budget, 0))
                batch.append((run, n, dict(run.meta)))
                budget -= n
        for run in self._dirty:
            if budget <= 0:
                break
            if run.urgent or run.flying:
                continue
            n = min(len(run.events), budget)
            batch.append((run, n, dict(run.meta)))
            budget -= n
        for run, n, _ in batch:
            run.inflight = n
            run.flying = True
            self._flying_events += n
        self._flying_runs += len(batch)
        return batch

    def _landing(self, batch: list[tuple[RunStream, int, dict[str, str]]]) -> None:
        """A round trip came back (or failed): its runs are no longer carried."""
        for run, n, _ in batch:
            run.inflight = 0
            run.flying = False
            self._flying_events -= n
        self._flying_runs -= len(batch)

    async def _round(
        self, batch: list[tuple[RunStream, int, dict[str, str]]], *, overlap: bool
    ) -> bool:
        """One round trip for these runs; True unless something has to be retried."""
        if not batch:
            # Only bookkeeping (the lease index, aliases): not a flush of any run.
            return await self._send(batch, trace.INVALID_SPAN, overlap) != "error"
        n_events = sum(n for _, n, _ in batch)
        links = (
            [Link(run.span_context) for run, _, _ in batch if run.span_context is not None]
            if self._links
            else None
        )
        with self._tracer.start_as_current_span(
            "sse.flush",
            kind=SpanKind.CLIENT,
            links=links,
            attributes={"sse.flush.events": n_events, "sse.flush.runs": len(batch)},
        ) as span:
            outcome = await self._send(batch, span, overlap)
            span.set_attribute("sse.flush.outcome", outcome)
            if outcome != "ok":
                span.set_status(StatusCode.ERROR)
        self._m.flushes.labels("ok" if outcome == "ok" else "error").inc()
        return outcome != "error"

    async def _send(
        self, batch: list[tuple[RunStream, int, dict[str, str]]], span: Span, overlap: bool
    ) -> str:
        """The round trip itself; its outcome: ok, retry (send again now), error (back off)."""
        leases: dict[RunId, int] = {}
        ended: list[RunId] = []
        aliases: dict[RunId, RunId] = {}
        if not overlap:
            leases, ended, aliases = self._leases, list(self._ended), self._aliases
            self._leases, self._aliases = {}, {}
            self._ended.clear()
        ops: list[AppendOp] = []
        for run, n, standalone in batch:
            events = list(islice(run.events, n))
            meta = dict(standalone)
            for ev in events:
                if ev.meta:
                    meta.update(ev.meta)
            # Holes the writer made (overflow) are recorded by the script; any other gap is
            # refused by it.
            gap = own_holes_only(run.written_seq, events, run.resumed)
            claim = "0" if run.claimed else ("1" if run.replace else "2")
            ops.append(
                AppendOp(run.run_id, run.producer, claim, run.written_seq, gap, meta, events)
            )
        started = time.perf_counter()
        if not overlap:
            self._armed = True
            if self._unsent() >= self._overlap_min:
                self._overlap.set()
        try:
            results = await self._store.append(
                ops,
                lease_ttl_ms=self._lease_ms,
                stream_ttl_ms=self._ttl_ms,
                maxlen=self._maxlen,
                leases=leases,
                ended=ended,
                aliases=aliases,
            )
        except BaseException as exc:
            # Nothing is known to have happened (a failure, or cancelled: a crash, shutdown):
            # the runs may be carried again, and the bookkeeping is sent again too.
            self._landing(batch)
            self._leases = {**leases, **self._leases}
            self._aliases = {**aliases, **self._aliases}
            self._ended.update(ended)
            if not isinstance(exc, StoreError):
                raise
            self._m.redis_errors.labels("flush").inc()
            span.record_exception(exc)
            log.warning("writer round trip failed, will retry: %s", exc)
            return "error"
        finally:
            if not overlap:
                self._armed = False
        self._landed_at = asyncio.get_running_loop().time()
        if batch:
            self._m.flush_duration.observe(time.perf_counter() - started, exemplar(span))
            self._m.flush_batch_events.observe(sum(n for _, n, _ in batch))
        self._landing(batch)
        outcome = "ok"
        for (run, n, standalone), result in zip(batch, results, strict=True):
            if result.status is AppendStatus.OK:
                self._settle(run, n, standalone, result)
            elif result.status is AppendStatus.RETRY:
                outcome = "retry"
            elif result.status is AppendStatus.REJECTED:
                self._script_failed(run, result.detail)
            else:
                self._refused(run, result)
        self._after_change()
        return outcome

    def _settle(
        self, run: RunStream, n: int, standalone: dict[str, str], result: AppendResult
    ) -> None:
        run.failures = 0
        if not run.claimed:
            run.claimed = True
            run.replaced = result.replaced
            if not run.claim.done():
                run.claim.set_result(True)
        if result.rebuilt:
            self._history_lost(run)
        if result.rolled_back:
            self._history_rolled_back(run, result.rolled_back)
        run.written_seq = result.last_seq
        if run.resumed:
            run.resumed = {seq for seq in run.resumed if seq > run.written_seq}
        complete = False
        stored = [run.events.popleft() for _ in range(n)]
        for ev in stored:
            complete = complete or ev.complete
            run.pending_bytes -= len(ev.data)
            self._pending_bytes -= len(ev.data)
        self._pending_events -= n
        if stored and self._feed is not None:
            self._feed.stored(run.run_id, stored)
        if complete:
            self._ended.add(run.run_id)
            self._wake.set()
            run.ended.set()
        if result.trimmed:
            self._m.stream_trimmed_events.inc(result.trimmed)
        for key, value in standalone.items():
            if run.meta.get(key) == value:
                del run.meta[key]
        if run.urgent and not result.rebuilt:
            run.urgent = False
            self._urgent.pop(run, None)
        if not run.events and not run.meta and not run.urgent:
            self._dirty.pop(run, None)
        elif run in self._dirty:
            # Served: behind every run that waits. Where it stayed in place, the runs at the
            # front (each with a new event or two by the time it was served) took every round
            # trip's budget whenever the writer was behind, and the runs behind them stored
            # nothing for seconds: 1,000 streams with a reader each, the newest runs' first
            # events were stored 4 s late, and their readers waited that long.
            self._dirty.move_to_end(run)

    def _history_lost(self, run: RunStream) -> None:
        """Redis no longer had the run (restarted empty, flushed, failed over to an empty
        replica): its meta was rebuilt; say so once, count the events it had, and write the
        initial meta again in the next round trip."""
        if not run.history_lost and run.written_seq:
            run.history_lost = True
            self._m.writer_dropped_events.labels("history_lost").inc(run.written_seq)
            log.error(
                "run %s: Redis lost its stored events 1-%d (restarted empty or flushed); the "
                "run is stored on from here and replays report history_lost",
                run.run_id,
                run.written_seq,
                extra={"run_id": run.run_id, "reason": "history_lost"},
            )
        self._add_meta(run, {k: v for k, v in run.initial.items() if k != fields.STATUS})
        self._leases[run.run_id] = self._deadline()

    def _history_rolled_back(self, run: RunStream, lost: int) -> None:
        """Redis holds the run, but not its last ``lost`` confirmed events (it failed over to a
        replica that lagged, or restarted from older data): the script recorded them as lost
        history and the run is stored on after them; count them, say so once per run."""
        self._m.writer_dropped_events.labels("history_lost").inc(lost)
        if not run.history_lost:
            run.history_lost = True
            log.error(
                "run %s: Redis lost %d of its stored events, up to seq %d (it failed over to a "
                "replica that had not received them, or restarted from older data); the run is "
                "stored on from here and replays report history_lost",
                run.run_id,
                lost,
                run.written_seq,
                extra={"run_id": run.run_id, "reason": "history_lost"},
            )

    def _refused(self, run: RunStream, result: AppendResult) -> None:
        # A refused claim (another producer, or a stored run that may not be replaced) is the
        # run id's owner defending it: counted as conflict, like a claim the writer lost.
        claim = result.status in (AppendStatus.CONFLICT, AppendStatus.EXISTS)
        reason = "conflict" if claim else result.status.value
        (log.warning if claim else log.error)(
            "run %s: Redis refused the write (%s, holder/last %s); its events are dropped",
            run.run_id,
            result.status.value,
            result.detail,
            extra={"run_id": run.run_id, "reason": reason},
        )
        if not run.claim.done():
            if result.status is AppendStatus.EXISTS:
                run.claim.set_result(RunExists(run.run_id))
            else:
                run.claim.set_result(RunConflict(run.run_id, result.detail or reason))
        run.fenced = reason
        self._discard(run, reason)

    def _script_failed(self, run: RunStream, detail: str) -> None:
        run.failures += 1
        self._m.redis_errors.labels("append").inc()
        log.warning(
            "run %s: append failed (%d/%d): %s",
            run.run_id,
            run.failures,
            MAX_SCRIPT_FAILURES,
            detail,
            extra={"run_id": run.run_id},
        )
        if run.failures >= MAX_SCRIPT_FAILURES:
            self._discard(run, "redis_rejected")


def own_holes_only(written: int, events: Iterable[Pending], resumed: set[int]) -> bool:
    """Whether these events (in order) skip seqs after ``written``, and only where the writer
    dropped them: right before a seq in ``resumed``. A batch may carry any number of those
    holes, not only the newest one (a run can overflow again before the events ahead of its
    first hole are written). Events at or below ``written`` are no gap: Redis stored them in a
    round trip whose reply was lost (the script skips them)."""
    expected = written + 1
    holes = False
    for ev in events:
        if ev.seq < expected:
            continue
        if ev.seq != expected:
            if ev.seq not in resumed:
                return False
            holes = True
        expected = ev.seq + 1
    return holes
