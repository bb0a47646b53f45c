"""A stored event as the store hands it out, and the reply parsing every reader shares.

The store's clients return ``XRANGE`` and ``XREAD`` replies as Redis sent them (``raw_reply``
is their response callback): redis-py's own callbacks build a dict per entry, and with the
entry's own construction that was most of a catch-up's CPU (py-spy, 10,000-event catch-up:
``pairs_to_dict`` 14 %, a frozen dataclass's ``__init__`` 9 %, ``parse_entry`` 21 % self).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter
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


class Page(NamedTuple):
    """A catch-up page as a replay sends it: the bytes of the events that follow the cursor
    without a hole, and what the reader needs to know about them. Built without an ``Entry``
    per event: in a catch-up (py-spy, 100,000-event run) building entries was 37 % of the
    sidecar's busy time, for bytes that are only joined and sent."""

    data: bytes  # the events after the cursor, up to the first hole, concatenated
    events: int  # how many events ``data`` holds
    last: int  # the seq of the last of them (the cursor if none)
    complete: bool  # the last of them is the run's last entry
    read: int  # how many entries Redis returned (more than ``events``: a hole after ``last``)
    newest: int  # the highest seq Redis returned (0 if none)


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


def contiguous(entries: Sequence[Entry], cursor: int) -> Sequence[Entry]:
    """The entries that follow ``cursor`` without a hole (seqs are contiguous when whole)."""
    for i, entry in enumerate(entries):
        if entry.seq != cursor + i + 1:
            return entries[:i]
    return entries


_fields = itemgetter(1)
_name0 = itemgetter(0)
_name6 = itemgetter(6)
_data = itemgetter(3)


def parse_page(page: Sequence[Any], cursor: int) -> Page:
    """A raw ``XRANGE`` reply of the events after ``cursor`` as a ``Page``.

    The common page (the scripts' layout, no hole) is checked and joined in passes that run in
    C (``map``, ``set``, ``bytes.join``): the scripts write each entry under the id
    ``<seq>-0``, so seqs rise strictly within a reply and the page is whole exactly when its
    first seq follows the cursor and its last is ``len(page) - 1`` further. Any other page (a hole,
    another layout) is read entry by entry.
    """
    n = len(page)
    if not n:
        return Page(b"", 0, cursor, False, 0, 0)
    fields = list(map(_fields, page))
    if (
        set(map(len, fields)) == {8}
        and set(map(_name0, fields)) == {b"seq_id"}
        and set(map(_name6, fields)) == {b"complete"}
    ):
        first, last = int(fields[0][1]), int(fields[-1][1])
        if first == cursor + 1 and last == cursor + n:
            data = b"".join(map(_data, fields))
            return Page(data, n, last, fields[-1][7] == b"true", n, last)
    entries = parse_entries(page)
    whole = contiguous(entries, cursor)
    return Page(
        b"".join(e.data for e in whole),
        len(whole),
        whole[-1].seq if whole else cursor,
        bool(whole) and whole[-1].complete,
        n,
        max(e.seq for e in entries),
    )
