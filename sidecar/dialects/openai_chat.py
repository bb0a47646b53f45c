"""The ``openai-chat`` dialect: OpenAI Chat Completions streams (and vLLM, LiteLLM, TGI, llama.cpp
server, and the gateways that speak it).

Each event is a ``chat.completion.chunk`` (``{"id": "chatcmpl-...", "choices": [...]}``); the last
``finish_reason`` of a choice says how the answer ended; ``data: [DONE]`` ends the stream. A
``{"error": {...}}`` chunk is an error (the official SDK raises ``APIError`` on it); servers send
it before their ``[DONE]``. When ``[DONE]`` never comes the sidecar appends what a Chat
Completions client expects of a failed stream: such an error chunk, then ``[DONE]``. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from sidecar.sse import Event
from sidecar.terminal import (
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
    cause_message,
    dumps,
    is_done,
)

# finish_reason -> status. A cut answer (length) or a filtered one (content_filter) is still a
# well-formed end of the stream: the stop_reason label tells them apart.
FINISH_REASON_STATUS: dict[str, Status] = {
    "stop": Status.COMPLETED,
    "tool_calls": Status.COMPLETED,
    "function_call": Status.COMPLETED,
    "length": Status.COMPLETED,
    "content_filter": Status.COMPLETED,
}

_SAW_STOP_REASON = (Transition.SAW_STOP_REASON,)
_SAW_ERROR = (Transition.SAW_ERROR,)
_DONE = Synthesized(data=DONE_DATA)


def error_chunk(reason: str, message: str) -> dict[str, Any]:
    """OpenAI's error shape (``type`` names the sidecar's reason)."""
    return {"error": {"message": message, "type": reason, "param": None, "code": None}}


class OpenAIChatTracker(DialectTracker):
    dialect = Dialect.OPENAI_CHAT
    STOP_REASONS = FINISH_REASON_STATUS

    __slots__ = ()

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        if self.saw_done or event.data is None:
            return ()
        self.events += 1
        if isinstance(payload, dict):
            # Truthy, as the SDK tests it: {"error": null} is not an error.
            if error := payload.get("error"):
                self._set_error(error)
                return _SAW_ERROR
            if self.protocol_id is None:
                self._set_protocol_id(payload.get("id"))
            choices = payload.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    if isinstance(choice, dict) and (reason := choice.get("finish_reason")):
                        self._set_stop_reason(reason)
                        return _SAW_STOP_REASON
            return ()
        if is_done(event):
            self.saw_done = True
            return DONE_AFTER_ERROR_TRANSITIONS if self.saw_error else DONE_TRANSITIONS
        return ()

    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        stop_reason, error = self.stop_reason, self.error
        if forced is ForcedDone.MISSING_DONE_AFTER_ERROR:
            return Status.FAILED, stop_reason, error, (_DONE,)
        if forced is ForcedDone.MISSING_DONE or (
            forced is ForcedDone.CANCELLED and stop_reason is not None
        ):
            # The answer had ended (finish_reason); only [DONE] is missing.
            return self.natural_status(), stop_reason, error, (_DONE,)
        status = Status.CANCELLED if forced is ForcedDone.CANCELLED else Status.FAILED
        if self.saw_error:  # the upstream said it failed already: only [DONE] is missing
            return Status.FAILED, stop_reason, error, (_DONE,)
        chunk = error_chunk(cause.value, cause_message(cause, detail))
        return status, stop_reason, chunk["error"], (Synthesized(data=dumps(chunk)), _DONE)
