"""The terminal tracker: how an LLM stream ends, and what the sidecar appends when it ends badly.

Pure: parsed SSE events in, transitions and a final ``Outcome`` out, no I/O. It implements the
terminal table of DESIGN.md for the ``letta`` dialect. The lesson it encodes: an error event does
not end a stream; the service's own ``[DONE]`` normally follows it, and only when that ``[DONE]``
never comes does the sidecar synthesize one (a *forced* terminal, counted by reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from sidecar.sse import Event

DONE_DATA = "[DONE]"


class Status(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EndCause(StrEnum):
    """Why the upstream stopped before sending ``[DONE]`` (the value is the forced_done reason)."""

    EOF = "stream_incomplete"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CANCELLED = "cancelled"
    SIDECAR_SHUTDOWN = "sidecar_shutdown"
    PRODUCER_LOST = "producer_lost"


class ForcedDone(StrEnum):
    MISSING_DONE = "missing_done"
    MISSING_DONE_AFTER_ERROR = "missing_done_after_error"
    STREAM_INCOMPLETE = "stream_incomplete"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CANCELLED = "cancelled"
    SIDECAR_SHUTDOWN = "sidecar_shutdown"
    PRODUCER_LOST = "producer_lost"


class Transition(StrEnum):
    SAW_STOP_REASON = "saw_stop_reason"
    SAW_ERROR = "saw_error"
    SAW_DONE = "saw_done"
    SAW_DONE_AFTER_ERROR = "saw_done_after_error"


# Letta's stop reasons and the run status each one means.
STOP_REASON_STATUS: dict[str, Status] = {
    "end_turn": Status.COMPLETED,
    "max_steps": Status.COMPLETED,
    "tool_rule": Status.COMPLETED,
    "requires_approval": Status.COMPLETED,
    "cancelled": Status.CANCELLED,
    "error": Status.FAILED,
    "llm_api_error": Status.FAILED,
    "invalid_llm_response": Status.FAILED,
    "invalid_tool_call": Status.FAILED,
    "no_tool_call": Status.FAILED,
    "max_tokens_exceeded": Status.FAILED,
    "insufficient_credits": Status.FAILED,
    "context_window_overflow_in_system_prompt": Status.FAILED,
}

_CAUSE_MESSAGES: dict[EndCause, str] = {
    EndCause.EOF: "the upstream closed the stream without a stop reason, an error or [DONE]",
    EndCause.UPSTREAM_ERROR: "the connection to the upstream failed before [DONE]",
    EndCause.UPSTREAM_TIMEOUT: "the upstream sent nothing within the read timeout",
    EndCause.CANCELLED: "the run was cancelled",
    EndCause.SIDECAR_SHUTDOWN: "the sidecar shut down before the upstream finished",
    EndCause.PRODUCER_LOST: "the sidecar producing this run stopped renewing its lease",
}


def stop_reason_label(stop_reason: str | None) -> str:
    """A bounded metric label: a known stop reason, ``none`` or ``other``."""
    if stop_reason is None:
        return "none"
    return stop_reason if stop_reason in STOP_REASON_STATUS else "other"


def run_status(stop_reason: str | None, saw_error: bool, default: Status) -> Status:
    """Status of a run that ended: from its stop reason, never masking a seen error as success."""
    if stop_reason is not None:
        status = STOP_REASON_STATUS.get(stop_reason, Status.COMPLETED)
        if status is Status.COMPLETED and saw_error:
            return Status.FAILED
        return status
    if saw_error:
        return Status.FAILED
    return default


@dataclass(slots=True, frozen=True)
class Synthesized:
    """An event the sidecar appends; it is encoded and stored exactly like an upstream event."""

    data: str
    event: str | None = None


@dataclass(slots=True, frozen=True)
class Outcome:
    status: Status
    stop_reason: str | None
    error: Any | None
    forced_done: ForcedDone | None
    synthesized: tuple[Synthesized, ...]
    saw_error: bool
    saw_done: bool

    @property
    def stop_reason_label(self) -> str:
        return stop_reason_label(self.stop_reason)


def is_done(event: Event) -> bool:
    return event.data is not None and event.event != "error" and event.data.strip() == DONE_DATA


def _stop_reason_event(reason: str) -> Synthesized:
    return Synthesized(data=f'{{"message_type":"stop_reason","stop_reason":"{reason}"}}')


def _error_payload(cause: EndCause, detail: str | None) -> dict[str, Any]:
    return {
        "message_type": "error_message",
        "error_type": cause.value,
        "message": _CAUSE_MESSAGES[cause],
        "detail": detail,
    }


@dataclass(slots=True)
class Tracker:
    """Watches one run's parsed events. Feed every event to ``observe``, then call ``finish``.

    ``default_status`` is the status of a run whose ``[DONE]`` came with neither a stop reason nor
    an error (the ``letta`` dialect says failed, so that a failure is never reported as success).
    """

    default_status: Status = Status.FAILED
    stop_reason: str | None = None
    error: Any | None = None
    saw_error: bool = False
    saw_done: bool = False
    _outcome: Outcome | None = field(default=None, repr=False)

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        """Record one upstream event; ``payload`` is its data parsed as JSON, if it parsed."""
        if self.saw_done or event.data is None:
            return ()
        if event.event == "error":
            first = not self.saw_error
            self.saw_error = True
            if first:
                self.error = payload if payload is not None else {"message": event.data}
            return (Transition.SAW_ERROR,)
        if isinstance(payload, dict):
            if payload.get("message_type") == "stop_reason":
                reason = payload.get("stop_reason")
                self.stop_reason = reason if isinstance(reason, str) else "other"
                return (Transition.SAW_STOP_REASON,)
            return ()
        if is_done(event):
            self.saw_done = True
            if self.saw_error:
                return (Transition.SAW_DONE, Transition.SAW_DONE_AFTER_ERROR)
            return (Transition.SAW_DONE,)
        return ()

    def finish(self, cause: EndCause = EndCause.EOF, detail: str | None = None) -> Outcome:
        """The run's outcome. ``cause`` only matters when no ``[DONE]`` came; idempotent."""
        if self._outcome is not None:
            return self._outcome
        synth: list[Synthesized] = []
        forced: ForcedDone | None
        error = self.error
        stop_reason = self.stop_reason
        if self.saw_done:
            forced = None
            status = run_status(stop_reason, self.saw_error, self.default_status)
        elif cause is EndCause.EOF and self.saw_error:
            forced = ForcedDone.MISSING_DONE_AFTER_ERROR
            status = Status.FAILED
        elif cause is EndCause.EOF and stop_reason is not None:
            forced = ForcedDone.MISSING_DONE
            status = run_status(stop_reason, False, self.default_status)
        elif cause is EndCause.CANCELLED:
            forced = ForcedDone.CANCELLED
            if stop_reason is None:
                stop_reason = "cancelled"
                synth.append(_stop_reason_event(stop_reason))
                status = Status.CANCELLED
            else:
                # The upstream had already said how the run ended; the cancel only cut off its
                # [DONE], so the status follows the stored events, as a replay would read them.
                status = run_status(stop_reason, self.saw_error, self.default_status)
        else:
            # stream_incomplete, upstream_error/timeout, sidecar_shutdown, producer_lost: append
            # what a failed stream carries (stop reason, error event), minus what already came.
            forced = ForcedDone(cause.value)
            if stop_reason is None:
                stop_reason = "error"
                synth.append(_stop_reason_event(stop_reason))
            if not self.saw_error:
                error = _error_payload(cause, detail)
                synth.append(Synthesized(data=orjson.dumps(error).decode(), event="error"))
            status = Status.FAILED
        if not self.saw_done:
            synth.append(Synthesized(data=DONE_DATA))
        self._outcome = Outcome(
            status=status,
            stop_reason=stop_reason,
            error=error,
            forced_done=forced,
            synthesized=tuple(synth),
            saw_error=self.saw_error,
            saw_done=self.saw_done,
        )
        return self._outcome
