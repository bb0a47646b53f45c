"""The run-meta schema: every field of ``sse:run:{<id>}:meta``, and the typed view of it.

The hash is written only by the store's scripts (``append.lua``, ``finalize.lua``), with the event
that changed it, so it always agrees with the stored events. Everything else reads it as a
``RunMeta``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.terminal import Outcome

STATUS = "status"
STOP_REASON = "stop_reason"
ERROR = "error"
LAST_SEQ = "last_seq"
CREATED_MS = "created_ms"
UPDATED_MS = "updated_ms"
FINISHED_MS = "finished_ms"
PRODUCER = "producer"
LEASE_UNTIL_MS = "lease_until_ms"
FORCED_DONE = "forced_done"
TRACE_ID = "trace_id"
ROUTE = "route"
GENERATION = "generation"  # set when the run started; a reused run id gets a new one
INCOMPLETE = "incomplete"
TRIMMED_EVENTS = "trimmed_events"
# Loss, recorded where it happened (DESIGN.md "When things fail"):
LOST_RANGES = "lost_ranges"  # "a-b,c-d": seqs the writer could not store (overflow)
LOST_EVENTS = "lost_events"  # how many seqs those ranges hold
HISTORY_LOST_THROUGH = "history_lost_through"  # Redis lost every event up to this seq
HISTORY_LOST_RANGES = "history_lost_ranges"  # "a-b,...": seqs Redis confirmed, then lost
# The dialect's (sidecar/dialects/): what a process needs to end the run in its protocol when
# its producer is gone.
DIALECT = "dialect"
PROTOCOL_ID = "protocol_id"
DIALECT_STATE = "dialect_state"  # JSON
SILENT_END = "silent_end"  # "true": the last entry has no bytes (a generic stream's end)

# ``incomplete`` values: why a replay of the run cannot return every event.
OVERFLOW = "overflow"
HISTORY_LOST = "history_lost"


def initial_meta(*, route: str, trace_id: str | None, **extra: str) -> dict[str, str]:
    """The fields a run starts with (written with its claim)."""
    meta = {STATUS: "running", CREATED_MS: str(now_ms()), ROUTE: route, **extra}
    if trace_id is not None:
        meta[TRACE_ID] = trace_id
    return meta


def final_meta(outcome: Outcome) -> dict[str, str]:
    """The fields a run's terminal sets."""
    meta = {
        STATUS: outcome.status.value,
        FINISHED_MS: str(now_ms()),
        FORCED_DONE: outcome.forced_done.value if outcome.forced_done else "",
        STOP_REASON: outcome.stop_reason or "",
        DIALECT: outcome.dialect.value,
    }
    if outcome.silent_end:
        # The last entry has no bytes: the client's last event is the one before it.
        meta[SILENT_END] = "true"
    if outcome.error is not None:
        meta[ERROR] = orjson.dumps(outcome.error).decode()
    return meta


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_ranges(text: str | None) -> tuple[tuple[int, int], ...]:
    """``"5-9,20-31"`` → ((5, 9), (20, 31)); malformed parts are skipped, not fatal."""
    out: list[tuple[int, int]] = []
    for part in (text or "").split(","):
        first, sep, last = part.partition("-")
        if sep and first.isdigit() and last.isdigit():
            out.append((int(first), int(last)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RunMeta:
    run_id: str
    status: str
    stop_reason: str | None
    error: Any | None
    last_seq: int
    created_ms: int | None
    updated_ms: int | None
    finished_ms: int | None
    producer: str | None
    lease_until_ms: int | None
    forced_done: str | None
    trace_id: str | None
    incomplete: str | None
    trimmed_events: int
    lost_ranges: tuple[tuple[int, int], ...] = ()
    history_lost_through: int = 0
    history_lost_ranges: tuple[tuple[int, int], ...] = ()
    dialect: str | None = None
    protocol_id: str | None = None
    dialect_state: str | None = None  # JSON: what the dialect needs to end the run elsewhere
    silent_end: bool = False
    generation: str | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def last_event_seq(self) -> int:
        """The seq of the last event a client received (the last entry may have no bytes)."""
        return self.last_seq - 1 if self.silent_end else self.last_seq

    def lost_range_at(self, seq: int) -> tuple[int, int] | None:
        """The range of seqs the writer could not store that holds ``seq``, if any."""
        return _range_at(self.lost_ranges, seq)

    def history_range_at(self, seq: int) -> tuple[int, int] | None:
        """The range of seqs Redis confirmed and then lost that holds ``seq``, if any."""
        return _range_at(self.history_lost_ranges, seq)

    @classmethod
    def from_hash(cls, run_id: str, raw: dict[Any, Any]) -> RunMeta:
        h = {_text(k): _text(v) for k, v in raw.items()}

        def num(key: str) -> int | None:
            value = h.get(key)
            return int(value) if value and value.lstrip("-").isdigit() else None

        error = h.get(ERROR)
        try:
            parsed_error = orjson.loads(error) if error else None
        except orjson.JSONDecodeError:
            parsed_error = {"message": error}
        return cls(
            run_id=run_id,
            status=h.get(STATUS, "unknown"),
            stop_reason=h.get(STOP_REASON) or None,
            error=parsed_error,
            last_seq=num(LAST_SEQ) or 0,
            created_ms=num(CREATED_MS),
            updated_ms=num(UPDATED_MS),
            finished_ms=num(FINISHED_MS),
            producer=h.get(PRODUCER),
            lease_until_ms=num(LEASE_UNTIL_MS),
            forced_done=h.get(FORCED_DONE) or None,
            trace_id=h.get(TRACE_ID) or None,
            incomplete=h.get(INCOMPLETE) or None,
            trimmed_events=num(TRIMMED_EVENTS) or 0,
            lost_ranges=parse_ranges(h.get(LOST_RANGES)),
            history_lost_through=num(HISTORY_LOST_THROUGH) or 0,
            history_lost_ranges=parse_ranges(h.get(HISTORY_LOST_RANGES)),
            dialect=h.get(DIALECT) or None,
            protocol_id=h.get(PROTOCOL_ID) or None,
            dialect_state=h.get(DIALECT_STATE) or None,
            silent_end=h.get(SILENT_END) == "true",
            generation=h.get(GENERATION) or None,
        )


def _range_at(ranges: tuple[tuple[int, int], ...], seq: int) -> tuple[int, int] | None:
    for first, last in ranges:
        if first <= seq <= last:
            return first, last
    return None
