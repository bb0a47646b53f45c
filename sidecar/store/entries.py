"""A stored event as the store hands it out, and the reply parsing every reader shares.

The store's clients return ``XRANGE`` and ``XREAD`` replies as Redis sent them (``raw_reply``
is their response callback): redis-py's own callbacks build a dict per entry, and with the
entry's own construction that was most of a catch-up's CPU (py-spy, 10,000-event catch-up:
``pairs_to_dict`` 14 %, a frozen dataclass's ``__init__`` 9 %, ``parse_entry`` 21 % self).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple


def text(value: Any) -> str:
    """A reply value as text (replies are bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Entry(NamedTuple):
    """One stored event: its bytes exactly as the live client received them (a named tuple:
    immutable and the cheapest to build, one per event per reader page)."""

    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool


def raw_reply(response: Any, **_options: Any) -> Any:
    """The response callback for ``XRANGE`` and ``XREAD`` on the store's clients: the reply as
    sent, parsed by ``parse_entries``."""
    return response


def parse_entries(page: Iterable[Any]) -> list[Entry]:
    """Entries from a raw ``XRANGE`` reply (or one stream of an ``XREAD`` reply). The append and
    finalize scripts write ``seq_id <seq> data <bytes> timestamp <ms> complete <true|false>``,
    in that order: read by position, by name only if another layout is found."""
    out: list[Entry] = []
    append = out.append
    for entry_id, fields in page:
        if len(fields) == 8 and fields[0] == b"seq_id" and fields[6] == b"complete":
            # seq_id is the entry id's first part (the scripts write both from one seq).
            append(Entry(int(fields[1]), fields[3], int(fields[5]), fields[7] == b"true"))
        else:  # another layout (written by an older version): by name
            raw_id = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
            seq = int(raw_id.split(b"-", 1)[0])
            named = dict(zip(fields[::2], fields[1::2], strict=False))
            data = named.get(b"data", b"")
            append(
                Entry(
                    seq,
                    data if isinstance(data, bytes) else str(data).encode(),
                    int(named.get(b"timestamp", b"0")),
                    named.get(b"complete") == b"true",
                )
            )
    return out
