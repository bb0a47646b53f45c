"""A stored event as the store hands it out, and the reply parsing every reader shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def text(value: Any) -> str:
    """A reply value as text (replies are bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(slots=True, frozen=True)
class Entry:
    """One stored event: its bytes exactly as the live client received them."""

    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> Entry:
    raw_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    data = fields.get(b"data", b"")
    return Entry(
        seq=int(raw_id.split("-", 1)[0]),
        data=data if isinstance(data, bytes) else str(data).encode(),
        timestamp_ms=int(fields.get(b"timestamp", b"0")),
        complete=fields.get(b"complete") == b"true",
    )
