"""The ``letta`` dialect: Letta's agent streams (DESIGN.md, "The run and its terminal").

Terminal ``data: [DONE]``; the stop reason from ``{"message_type": "stop_reason", ...}``; an error
from ``event: error``. A well-behaved Letta server sends, on error, stop_reason → ``event: error``
→ ``[DONE]``: the error event does not end the run, its ``[DONE]`` does. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from sidecar.sse import Event
from sidecar.terminal import (
    CAUSE_MESSAGES,
    DONE_AFTER_ERROR_TRANSITIONS,
    DONE_DATA,
    DONE_TRANSITIONS,
    Dialect,
    DialectTracker,
    EndCause,
    ForcedDone,
    Status,
    Synthesized,
    Transition,
    dumps,
    error_data,
    is_done,
)

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

_SAW_STOP_REASON = (Transition.SAW_STOP_REASON,)
_SAW_ERROR = (Transition.SAW_ERROR,)
_DONE = Synthesized(data=DONE_DATA)


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


def _stop_reason_event(reason: str) -> Synthesized:
    return Synthesized(data=f'{{"message_type":"stop_reason","stop_reason":"{reason}"}}')


# In Letta's words: its terminal is [DONE].
_MESSAGES = {
    **CAUSE_MESSAGES,
    EndCause.EOF: "the upstream closed the stream without a stop reason, an error or [DONE]",
    EndCause.UPSTREAM_ERROR: "the connection to the upstream failed before [DONE]",
}


def error_payload(cause: EndCause, detail: str | None) -> dict[str, Any]:
    return {
        "message_type": "error_message",
        "error_type": cause.value,
        "message": _MESSAGES[cause],
        "detail": detail,
    }


class LettaTracker(DialectTracker):
    dialect = Dialect.LETTA
    STOP_REASONS = STOP_REASON_STATUS
    fills_ids = True

    __slots__ = ()

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        if self.saw_done or event.data is None:
            return ()
        self.events += 1
        if event.event == "error":
            self._set_error(error_data(event, payload))
            return _SAW_ERROR
        if isinstance(payload, dict):
            if self.protocol_id is None:
                # The upstream's own run id, which its clients resume with.
                self._set_protocol_id(payload.get("run_id"))
            if payload.get("message_type") == "stop_reason":
                self._set_stop_reason(payload.get("stop_reason"))
                return _SAW_STOP_REASON
            return ()
        if is_done(event):
            self.saw_done = True
            return DONE_AFTER_ERROR_TRANSITIONS if self.saw_error else DONE_TRANSITIONS
        return ()

    def natural_status(self) -> Status:
        return run_status(self.stop_reason, self.saw_error, self.default_status)

    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        stop_reason, error = self.stop_reason, self.error
        if forced is ForcedDone.MISSING_DONE_AFTER_ERROR:
            return Status.FAILED, stop_reason, error, (_DONE,)
        if forced is ForcedDone.MISSING_DONE:
            return run_status(stop_reason, False, self.default_status), stop_reason, error, (_DONE,)
        if forced is ForcedDone.CANCELLED:
            if stop_reason is not None:
                # The upstream had already said how the run ended; the cancel only cut off its
                # [DONE], so the status follows the stored events, as a replay would read them.
                status = run_status(stop_reason, self.saw_error, self.default_status)
                return status, stop_reason, error, (_DONE,)
            return Status.CANCELLED, "cancelled", error, (_stop_reason_event("cancelled"), _DONE)
        # stream_incomplete, upstream_error/timeout, sidecar_shutdown, producer_lost: append what
        # a failed stream carries (stop reason, error event), minus what already came.
        synth: list[Synthesized] = []
        if stop_reason is None:
            stop_reason = "error"
            synth.append(_stop_reason_event(stop_reason))
        if not self.saw_error:
            error = error_payload(cause, detail)
            synth.append(Synthesized(data=dumps(error), event="error"))
        synth.append(_DONE)
        return Status.FAILED, stop_reason, error, tuple(synth)
