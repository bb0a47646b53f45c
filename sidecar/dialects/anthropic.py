"""The ``anthropic`` dialect: Anthropic Messages streams.

``message_start`` names the message (``msg_...``), ``content_block_*`` events carry it,
``message_delta`` gives ``delta.stop_reason``, ``message_stop`` ends the stream; ``ping`` events
keep it alive. A failed message ends at ``event: error`` (``{"type": "error", "error": {"type":
"overloaded_error", ...}}``): that is the upstream's own terminal too.

When neither comes the sidecar appends what an Anthropic client expects of a failed stream: an
``event: error`` with an ``api_error`` (the official SDK raises ``APIStatusError``), or, when the
message had already said how it stopped, just its missing ``message_stop``. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from sidecar.sse import Event
from sidecar.terminal import (
    ERROR_TERMINAL_TRANSITIONS,
    Dialect,
    DialectTracker,
    EndCause,
    ForcedDone,
    Status,
    Synthesized,
    Transition,
    cause_message,
    dumps,
    error_data,
)

# message_delta.delta.stop_reason: every one is a well-formed end of the message.
STOP_REASON_STATUS: dict[str, Status] = {
    "end_turn": Status.COMPLETED,
    "max_tokens": Status.COMPLETED,
    "stop_sequence": Status.COMPLETED,
    "tool_use": Status.COMPLETED,
    "pause_turn": Status.COMPLETED,
    "refusal": Status.COMPLETED,
    "model_context_window_exceeded": Status.COMPLETED,
}
_SAW_STOP_REASON = (Transition.SAW_STOP_REASON,)
_DONE = (Transition.SAW_DONE,)
MESSAGE_STOP = Synthesized(data='{"type":"message_stop"}', event="message_stop")


def error_event(message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": "api_error", "message": message}}


class AnthropicTracker(DialectTracker):
    dialect = Dialect.ANTHROPIC
    STOP_REASONS = STOP_REASON_STATUS

    __slots__ = ()

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        if self.saw_done or event.data is None:
            return ()
        self.events += 1
        kind = payload.get("type") if isinstance(payload, dict) else None
        if event.event == "error" or kind == "error":
            error = payload.get("error") if isinstance(payload, dict) else None
            self._set_error(error if error is not None else error_data(event, payload))
            self.saw_done = True
            return ERROR_TERMINAL_TRANSITIONS
        if kind == "message_delta":
            delta = payload.get("delta") if isinstance(payload, dict) else None
            if isinstance(delta, dict) and (reason := delta.get("stop_reason")):
                self._set_stop_reason(reason)
                return _SAW_STOP_REASON
        elif kind == "message_stop":
            self.saw_done = True
            return _DONE
        elif kind == "message_start" and isinstance(payload, dict):
            message = payload.get("message")
            if isinstance(message, dict):
                self._set_protocol_id(message.get("id"))
        return ()

    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        stop_reason = self.stop_reason
        if stop_reason is not None and forced in (ForcedDone.MISSING_DONE, ForcedDone.CANCELLED):
            # The message had said how it stopped; only its message_stop is missing.
            return self.natural_status(), stop_reason, self.error, (MESSAGE_STOP,)
        status = Status.CANCELLED if forced is ForcedDone.CANCELLED else Status.FAILED
        payload = error_event(cause_message(cause, detail))
        return status, stop_reason, payload["error"], (Synthesized(dumps(payload), "error"),)
