"""Ending a run: the one implementation every path shares.

A run ends in its tee (the upstream finished, failed, was cancelled, or the sidecar shut down),
or, when its producer died, in whichever process finds it orphaned (the sweep, or a cancel with
no producer left). Either way the outcome is recorded here, so metrics, logs and spans agree
whichever path ended it: ``runs_finished_total``, ``forced_done_total``,
``run_duration_seconds``, one warning for a forced terminal (nothing above debug for a natural
end), and the ``sse.run`` span's attributes and events.
"""

from __future__ import annotations

import logging
import time

from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer

from sidecar.dialects import restore_tracker
from sidecar.keys import RunId
from sidecar.payload import render_event
from sidecar.store import FinalizeStatus, Pending, RunStore
from sidecar.store.meta import final_meta, now_ms
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause, Outcome, Status
from sidecar.tracing import exemplar

log = logging.getLogger(__name__)


def record_end(
    metrics: Metrics,
    outcome: Outcome,
    *,
    run_id: RunId,
    duration: float,
    span: Span,
    detail: str | None = None,
) -> None:
    """Count, trace and log a run's end (its events are stored by the caller)."""
    status, dialect = outcome.status.value, outcome.dialect.value
    metrics.runs_finished.labels(status, outcome.stop_reason_label, dialect).inc()
    metrics.run_duration.labels(status).observe(duration, exemplar(span))
    span.set_attributes(
        {
            "sse.status": status,
            "sse.stop_reason": outcome.stop_reason or "",
            "sse.forced_done": outcome.forced_done.value if outcome.forced_done else "",
        }
    )
    if outcome.status is Status.FAILED:
        span.set_status(StatusCode.ERROR, f"run {status}")
    if outcome.forced_done is None:
        log.debug("run finished: %s", status, extra={"run_id": run_id})
        return
    reason = outcome.forced_done.value
    metrics.forced_done.labels(reason, dialect).inc()
    span.add_event("forced_done", {"sse.reason": reason, "sse.detail": detail or ""})
    log.warning(
        "run ended without the upstream's own terminal: forced %s",
        reason,
        extra={
            "run_id": run_id,
            "dialect": dialect,
            "reason": reason,
            "saw_error": outcome.saw_error,
            "saw_done": outcome.saw_done,
            "detail": detail,
        },
    )


class Finalizer:
    """Ends runs that no producer will end, atomically and exactly once across replicas."""

    def __init__(
        self,
        store: RunStore,
        metrics: Metrics,
        tracer: Tracer,
        *,
        finalizer_id: str,
        ttl_seconds: int,
        default_status: Status,
    ) -> None:
        self._store = store
        self._m = metrics
        self._tracer = tracer
        self._id = finalizer_id
        self._ttl = ttl_seconds
        self._default_status = default_status

    async def end(self, run_id: RunId, cause: EndCause, *, require_dead: bool) -> FinalizeStatus:
        """End ``run_id`` with ``cause``'s terminal, if it is still running (and, with
        ``require_dead``, only if its producer's lease has expired by Redis' clock)."""
        for _ in range(10):
            meta = await self._store.meta(run_id)
            if meta is None:
                return FinalizeStatus.MISSING
            if not meta.running:
                return FinalizeStatus.ALREADY_ENDED
            # The run's own dialect, from its meta alone: its producer is gone.
            tracker = restore_tracker(
                meta.dialect,
                stop_reason=meta.stop_reason,
                error=meta.error,
                last_seq=meta.last_seq,
                protocol_id=meta.protocol_id,
                dialect_state=meta.dialect_state,
                default_status=self._default_status,
            )
            outcome = tracker.finish(cause)
            stamp = now_ms()
            last = len(outcome.synthesized) - 1
            events = [
                Pending(
                    meta.last_seq + i + 1,
                    b""
                    if synth.data is None  # a stored end without bytes (generic)
                    else render_event(
                        synth.data,
                        event=synth.event,
                        retry=None,
                        seq=meta.last_seq + i + 1,
                        run_id=run_id,
                        fill=tracker.fills_ids,
                    ),
                    stamp,
                    i == last,
                )
                for i, synth in enumerate(outcome.synthesized)
            ]
            result = await self._store.finalize(
                run_id,
                finalizer=self._id,
                expected_last=meta.last_seq,
                require_dead=require_dead,
                ttl_seconds=self._ttl,
                meta=final_meta(outcome),
                events=events,
            )
            if result.status is FinalizeStatus.MOVED_ON:
                continue
            if result.status is FinalizeStatus.ENDED:
                started = (meta.created_ms or stamp) / 1000
                with self._tracer.start_as_current_span(
                    "sse.run",
                    kind=SpanKind.INTERNAL,
                    attributes={
                        "sse.run_id": run_id,
                        "sse.finalized_by": self._id,
                        "sse.events": result.last_seq,
                    },
                ) as span:
                    record_end(
                        self._m,
                        outcome,
                        run_id=run_id,
                        duration=max(0.0, time.time() - started),
                        span=span,
                        detail=f"ended by {self._id}",
                    )
            return result.status
        return FinalizeStatus.MOVED_ON
