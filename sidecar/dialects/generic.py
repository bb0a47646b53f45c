"""The ``generic`` dialect: any other event stream.

Nothing is known of its vocabulary, so nothing is invented: ``data: [DONE]`` ends it if the stream
uses it, else a clean close at an event boundary is its natural end (completed). When it ends any
other way (reset, timeout, a close inside an event, cancel, shutdown, a lost producer) the sidecar
appends nothing to the stream: the reason is recorded and counted, the stored run ends with an
entry that has no bytes, and the live client's connection is cut, as the upstream's failure would
have shown it. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sidecar.sse import Event
from sidecar.terminal import (
    DONE_TRANSITIONS,
    SILENT_END,
    Dialect,
    DialectTracker,
    EndCause,
    ForcedDone,
    Status,
    Synthesized,
    Transition,
    cause_message,
    is_done,
)


class GenericTracker(DialectTracker):
    dialect = Dialect.GENERIC
    STOP_REASONS: ClassVar[dict[str, Status]] = {}
    cuts_client_on_forced = True

    __slots__ = ()

    def observe(self, event: Event, payload: Any = None) -> tuple[Transition, ...]:
        if self.saw_done or event.data is None:
            return ()
        self.events += 1
        if is_done(event):
            self.saw_done = True
            return DONE_TRANSITIONS
        return ()

    def natural_eof(self) -> bool:
        return True

    def natural_status(self) -> Status:
        return Status.COMPLETED

    def synthesize(
        self, forced: ForcedDone, cause: EndCause, detail: str | None
    ) -> tuple[Status, str | None, Any, tuple[Synthesized, ...]]:
        status = Status.CANCELLED if forced is ForcedDone.CANCELLED else Status.FAILED
        error = {"type": forced.value, "message": cause_message(cause, detail)}
        return status, None, error, (SILENT_END,)
