"""The tracker core shared by every dialect: how an LLM stream ends, and what the sidecar appends
when it ends badly.

Pure: parsed SSE events in, transitions and a final ``Outcome`` out, no I/O. The lesson it encodes:
an error does not end a stream by itself in every protocol; the service's own terminal ("[DONE]",
``message_stop``, ``response.completed``...) normally follows, and only when that terminal never
comes does the sidecar synthesize one (a *forced* terminal, counted by reason).

This module holds what every protocol shares: the names (statuses, end causes, forced reasons,
transitions), the ``Outcome``, and ``DialectTracker``, whose ``finish`` decides *whether* and *why*
a run was forced. Each protocol's module in ``sidecar.dialects`` decides *what* its own stream looks
like: which events are its terminal, stop reason and error, and which events it appends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import orjson

from sidecar.sse import Event

DONE_DATA = "[DONE]"


class Dialect(StrEnum):
    """The protocols the sidecar speaks; the value is the setting and the metric label."""

    LETTA = "letta"
    OPENAI_CHAT = "openai-chat"
    OPENAI_RESPONSES = "openai-responses"
    ANTHROPIC = "anthropic"
    GENERIC = "generic"


class Status(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EndCause(StrEnum):
    """Why the upstream stopped before its own terminal (the value is the forced_done reason)."""

    EOF = "stream_incomplete"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CANCELLED = "cancelled"
    SIDECAR_SHUTDOWN = "sidecar_shutdown"
    PRODUCER_LOST = "producer_lost"


class ForcedDone(StrEnum):
    # missing_done: the protocol's terminal event never came after a stop reason.
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
    SAW_DONE = "saw_done"  # the protocol's own terminal
    SAW_DONE_AFTER_ERROR = "saw_done_after_error"


DONE_TRANSITIONS = (Transition.SAW_DONE,)
DONE_AFTER_ERROR_TRANSITIONS = (Transition.SAW_DONE, Transition.SAW_DONE_AFTER_ERROR)
# A protocol whose error event is its terminal (Anthropic, OpenAI Responses).
ERROR_TERMINAL_TRANSITIONS = (
    Transition.SAW_ERROR,
    Transition.SAW_DONE,
    Transition.SAW_DONE_AFTER_ERROR,
)

CAUSE_MESSAGES: dict[EndCause, str] = {
    EndCause.EOF: "the upstream closed the stream before its terminal event",
    EndCause.UPSTREAM_ERROR: "the connection to the upstream failed before its terminal event",
    EndCause.UPSTREAM_TIMEOUT: "the upstream sent nothing within the read timeout",
    EndCause.CANCELLED: "the run was cancelled",
    EndCause.SIDECAR_SHUTDOWN: "the sidecar shut down before the upstream finished",
    EndCause.PRODUCER_LOST: "the sidecar producing this run stopped renewing its lease",
}


def cause_message(cause: EndCause, detail: str | None) -> str:
    """A human sentence for a forced end, naming its reason (what clients show their users)."""
    text = f"sse-sidecar: {cause.value}: {CAUSE_MESSAGES[cause]}"
    return f"{text} ({detail})" if detail else text


@dataclass(slots=True, frozen=True)
class Synthesized:
    """An event the sidecar appends; it is encoded and stored exactly like an upstream event.

    ``data`` None is an end with no bytes: stored as the run's last entry (empty ``data``,
    ``complete``) so that replay readers know the run ended, and sent to no client.
    """

    data: str | None
    event: str | None = None


# The stored end of a run whose protocol has nothing to append (generic).
SILENT_END = Synthesized(data=None)


@dataclass(slots=True, frozen=True)
class Outcome:
    dialect: Dialect
    status: Status
    stop_reason: str | None
    error: Any | None
    forced_done: ForcedDone | None
    synthesized: tuple[Synthesized, ...]
    saw_error: bool
    saw_done: bool
    stop_reason_label: str

    @property
    def silent_end(self) -> bool:
        """The run's last stored entry has no bytes (the client's last event came before it)."""
        return bool(self.synthesized) and self.synthesized[-1].data is None


def bounded_label(stop_reason: str | None, known: Mapping[str, Status]) -> str:
    """A bounded metric label: a known stop reason, ``none`` or ``other``."""
    if stop_reason is None:
        return "none"
    return stop_reason if stop_reason in known else "other"


def stop_reason_label(stop_reason: str | None) -> str:
    """The label of a Letta stop reason (kept for the callers from before the dialects)."""
    from sidecar.dialects.letta import STOP_REASON_STATUS

    return bounded_label(stop_reason, STOP_REASON_STATUS)


def is_done(event: Event) -> bool:
    """The ``data: [DONE]`` marker (an ``event: error`` carrying it is an error, not a done)."""
    return event.data is not None and event.event != "error" and event.data.strip() == DONE_DATA


def error_data(event: Event, payload: Any) -> Any:
    """An error event's payload as the run's error: its JSON, else its text."""
    return payload if payload is not None else {"message": event.data}


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class DialectTracker(ABC):
    """Watches one run's parsed events: feed every data event to ``observe``, then ``finish``.

    The tee and the orphan finalizer both use it: the tee from the first event, the finalizer
    from the run's stored meta (``restore``). ``meta`` collects the meta fields that changed since
    the tee last took them, so they are written with the event that changed them; everything a
    dialect needs to synthesize its terminal is in those fields.

    ``default_status`` is the status of a natural end that said neither how the run ended nor that
    it failed (``status_without_stop_reason``).
    """

    dialect: ClassVar[Dialect]
    # Stop reasons the dialect knows, and the status each gives (the metric's bounded labels).
    STOP_REASONS: ClassVar[Mapping[str, Status]]
    # letta only: fill seq_id/run_id in JSON payloads.
    fills_ids: ClassVar[bool] = False
    # generic only: a forced end appends nothing, so the live client's connection is cut instead.
    cuts_client_on_forced: ClassVar[bool] = False

    __slots__ = (
        "_outcome",
        "default_status",
        "error",
        "events",
        "meta",
        "partial_event",
        "protocol_id",
        "saw_done",
        "saw_error",
        "stop_reason",
    )

    def __init__(self, default_status: Status = Status.FAILED) -> None:
        self.default_status = default_status
        self.stop_reason: str | None = None
        self.error: Any | None = None
        self.saw_error = False
        self.saw_done = False  # the protocol's own terminal came
        self.protocol_id: str | None = None  # chatcmpl-..., resp_..., msg_...
        self.events = 0  # data events observed: the seq of the last one
        # Set by the tee when the upstream closed inside an event (not at an event boundary).
        self.partial_event = False
        self.meta: dict[str, str] = {}
        self._outcome: Outcome | None = None

    # -- what a dialect implements -------------------------------------------------------------

    @abstractmethod
    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        """Record one upstream data event; ``payload`` is its data parsed as JSON, if it parsed.
        Events after the terminal are ignored."""

    def natural_status(self) -> Status:
        """The status of a run whose own terminal came: failed once an error was seen, else its
        stop reason's (an unknown one: completed), else ``default_status``."""
        if self.saw_error:
            return Status.FAILED
        if self.stop_reason is None:
            return self.default_status
        return self.STOP_REASONS.get(self.stop_reason, Status.COMPLETED)

    @abstractmethod
    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        """What a client of this protocol expects when the terminal never came: the run's
        (status, stop_reason, error, appended events); exactly one terminal, last."""

    def natural_eof(self) -> bool:
        """Whether a clean close at an event boundary is this protocol's own end (generic)."""
        return False

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take back the dialect's own fields from ``dialect_state`` (see ``state_meta``)."""
        return

    # -- shared --------------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        *,
        stop_reason: str | None,
        error: Any | None,
        last_seq: int,
        protocol_id: str | None,
        state: Mapping[str, Any] | None,
        default_status: Status = Status.FAILED,
    ) -> DialectTracker:
        """The tracker of a run that is still running, from its stored meta alone (the orphan
        finalizer ends it in another process than the one that produced it)."""
        tracker = cls(default_status)
        tracker.stop_reason = stop_reason
        tracker.error = error
        tracker.saw_error = error is not None
        tracker.events = last_seq
        tracker.protocol_id = protocol_id
        if state:
            tracker.restore_state(state)
        tracker.meta.clear()
        return tracker

    def take_meta(self) -> dict[str, str] | None:
        """The meta fields changed since the last call (None when nothing changed)."""
        if not self.meta:
            return None
        out, self.meta = self.meta, {}
        return out

    def _set_stop_reason(self, reason: Any) -> None:
        self.stop_reason = reason if isinstance(reason, str) else "other"
        self.meta["stop_reason"] = self.stop_reason

    def _set_error(self, error: Any) -> None:
        """The first error wins: it is the run's error."""
        if not self.saw_error:
            self.saw_error = True
            self.error = error
            self.meta["error"] = dumps(error)

    def _set_protocol_id(self, value: Any) -> None:
        if self.protocol_id is None and isinstance(value, str) and value:
            self.protocol_id = value
            self.meta["protocol_id"] = value

    def label(self, stop_reason: str | None) -> str:
        return bounded_label(stop_reason, self.STOP_REASONS)

    def finish(self, cause: EndCause = EndCause.EOF, detail: str | None = None) -> Outcome:
        """The run's outcome. ``cause`` only matters when the terminal never came; idempotent."""
        if self._outcome is not None:
            return self._outcome
        saw_done = self.saw_done
        if not saw_done and cause is EndCause.EOF and not self.partial_event and self.natural_eof():
            saw_done = True
        synth: tuple[Synthesized, ...] = ()
        forced: ForcedDone | None = None
        stop_reason, error = self.stop_reason, self.error
        if saw_done:
            status = self.natural_status()
            if not self.saw_done:
                synth = (SILENT_END,)  # nothing after the last event marks the end: store one
        else:
            if cause is EndCause.EOF and self.saw_error:
                forced = ForcedDone.MISSING_DONE_AFTER_ERROR
            elif cause is EndCause.EOF and self.stop_reason is not None:
                forced = ForcedDone.MISSING_DONE
            else:
                forced = ForcedDone(cause.value)
            status, stop_reason, error, synth = self.synthesize(forced, cause, detail)
        self._outcome = Outcome(
            dialect=self.dialect,
            status=status,
            stop_reason=stop_reason,
            error=error,
            forced_done=forced,
            synthesized=synth,
            saw_error=self.saw_error,
            saw_done=saw_done,
            stop_reason_label=self.label(stop_reason),
        )
        return self._outcome


def __getattr__(name: str) -> Any:
    # Letta's tracker and table now live in sidecar.dialects.letta; imported lazily here, as
    # that module imports this one.
    if name in ("Tracker", "STOP_REASON_STATUS", "run_status"):
        from sidecar.dialects import letta

        return getattr(letta, "LettaTracker" if name == "Tracker" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
