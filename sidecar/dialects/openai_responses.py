"""The ``openai-responses`` dialect: OpenAI Responses API streams.

Every event is typed (``event: response.output_text.delta`` with ``{"type": ..., "sequence_number":
N, ...}``); ``response.created`` names the response (``resp_...``); the stream ends with
``response.completed``, ``response.incomplete``, ``response.failed`` or ``error``, and has no
``[DONE]``. ``sequence_number`` is the protocol's own resume cursor
(``GET /v1/responses/{id}?stream=true&starting_after=N``).

When the terminal never comes the sidecar appends ``response.failed`` for the response the stream
named (the official SDK's stream helper then raises, as it does for the upstream's own
``response.failed``), or an ``error`` event when no response was named yet. Either continues the
``sequence_number``s. Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

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
)

# The stop reason of a Responses run: the terminal's response status, or for an incomplete
# response, its incomplete_details.reason.
STOP_REASON_STATUS: dict[str, Status] = {
    "completed": Status.COMPLETED,
    "max_output_tokens": Status.COMPLETED,
    "max_messages": Status.COMPLETED,
    "content_filter": Status.COMPLETED,
    "steered": Status.COMPLETED,
    "incomplete": Status.COMPLETED,
    "failed": Status.FAILED,
    "error": Status.FAILED,
    "cancelled": Status.CANCELLED,
}
_LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress"})
_DONE = (Transition.SAW_DONE,)
# The Response fields a synthesized response.failed repeats from the stream's response.created.
_SNAPSHOT = ("model", "created_at")
# seq - sequence_number of a stream that follows OpenAI (the first event's number is 0).
DEFAULT_OFFSET = 1


class OpenAIResponsesTracker(DialectTracker):
    dialect = Dialect.OPENAI_RESPONSES
    STOP_REASONS = STOP_REASON_STATUS

    __slots__ = ("_status", "offset", "snapshot")

    def __init__(self, default_status: Status = Status.FAILED) -> None:
        super().__init__(default_status)
        self._status = Status.FAILED
        # seq - sequence_number, as of the last numbered event: maps the protocol's cursor to
        # the sidecar's, and numbers synthesized events.
        self.offset = DEFAULT_OFFSET
        self.snapshot: dict[str, Any] = {}

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        if self.saw_done or event.data is None:
            return ()
        self.events += 1
        if not isinstance(payload, dict):
            return ()
        number = payload.get("sequence_number")
        if type(number) is int and self.events - number != self.offset:
            self.offset = self.events - number
            self.meta["dialect_state"] = self._state()
        kind = payload.get("type", event.event)
        if kind in _LIFECYCLE:
            if self.protocol_id is None:
                self._take_snapshot(payload.get("response"))
            return ()
        if kind == "error":
            fields = {k: v for k, v in payload.items() if k not in ("type", "sequence_number")}
            return self._end(Status.FAILED, "error", fields)
        if kind == "response.completed":
            return self._end(Status.COMPLETED, "completed")
        if kind == "response.incomplete":
            response = payload.get("response")
            details = response.get("incomplete_details") if isinstance(response, dict) else None
            reason = details.get("reason") if isinstance(details, dict) else None
            return self._end(Status.COMPLETED, reason or "incomplete")
        if kind == "response.failed":
            response = payload.get("response")
            failure = response.get("error") if isinstance(response, dict) else None
            return self._end(Status.FAILED, "failed", failure or {"message": "response.failed"})
        return ()

    def _take_snapshot(self, response: Any) -> None:
        if not isinstance(response, dict):
            return
        self._set_protocol_id(response.get("id"))
        self.snapshot = {k: response[k] for k in _SNAPSHOT if k in response}
        self.meta["dialect_state"] = self._state()

    def _end(self, status: Status, reason: str, error: Any = None) -> tuple[Transition, ...]:
        self.saw_done = True
        self._status = status
        self._set_stop_reason(reason)
        if error is None:
            return _DONE
        self._set_error(error)
        return ERROR_TERMINAL_TRANSITIONS

    def _state(self) -> str:
        return dumps({"offset": self.offset, **self.snapshot})

    def restore_state(self, state: Mapping[str, Any]) -> None:
        offset = state.get("offset")
        if type(offset) is int:
            self.offset = offset
        self.snapshot = {k: state[k] for k in _SNAPSHOT if k in state}

    def natural_status(self) -> Status:
        return STOP_REASON_STATUS.get(self.stop_reason or "", self._status)

    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        # Only a terminal carries a stop reason or an error here, so no terminal means neither:
        # every forced end is a failed (or cancelled) response.
        cancelled = forced is ForcedDone.CANCELLED
        status = Status.CANCELLED if cancelled else Status.FAILED
        number = self.events + 1 - self.offset
        message = cause_message(cause, detail)
        error = {"code": "server_error", "message": message, "type": cause.value}
        if self.protocol_id is None:
            # An error event has no room for the reason but its message.
            payload: dict[str, Any] = {"type": "error", "code": "server_error"}
            payload |= {"message": message, "param": None, "sequence_number": number}
            return status, "error", error, (Synthesized(dumps(payload), "error"),)
        response = {
            "id": self.protocol_id,
            "object": "response",
            **self.snapshot,
            "status": status.value,
            "error": error,
            "incomplete_details": None,
            "output": [],
        }
        payload = {"type": "response.failed", "sequence_number": number, "response": response}
        reason = "cancelled" if cancelled else "failed"
        return status, reason, error, (Synthesized(dumps(payload), "response.failed"),)


def resume_cursor(dialect_state: str | None, starting_after: int) -> int:
    """The sidecar seq after which to replay for the protocol's ``starting_after`` (a
    ``sequence_number``), from the run's stored dialect state."""
    offset = DEFAULT_OFFSET
    if dialect_state:
        try:
            state = orjson.loads(dialect_state)
        except orjson.JSONDecodeError:
            state = None
        if isinstance(state, dict) and type(state.get("offset")) is int:
            offset = state["offset"]
    return max(0, starting_after + offset)
