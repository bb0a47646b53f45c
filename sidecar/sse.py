"""Incremental server-sent-events decoder and encoder (WHATWG HTML, "Server-sent events").

Pure: bytes in, items out, no I/O. ``SSEDecoder.feed`` accepts chunks split anywhere (inside a
line, inside a CRLF pair, inside a multi-byte UTF-8 character) and returns the items completed so
far: a ``Comment`` as soon as its line ends, so heartbeats are relayed without waiting for a blank
line, and an ``Event`` when the blank line that ends its field block arrives.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sidecar.errors import EventTooLarge

_BOM = b"\xef\xbb\xbf"
_NEWLINES = re.compile(r"\r\n|\r|\n")


class Event(NamedTuple):
    """One field block ended by a blank line.

    ``data`` is ``None`` when the block had no ``data`` field: the spec does not dispatch such a
    block to listeners (it may still carry ``retry``), so the tee relays it but does not store it.

    A named tuple (immutable, and the cheapest object to build: one per event of every stream;
    a frozen dataclass's ``__init__`` was a visible share of the decoder's time).
    """

    data: str | None
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class Comment(NamedTuple):
    """A line starting with ``:``; ``text`` is everything after the colon."""

    text: str


Item = Event | Comment


class SSEDecoder:
    """Turns a byte stream into ``Event`` and ``Comment`` items.

    ``max_event_bytes`` bounds the bytes buffered for one event (its lines plus any unfinished
    line); past it ``feed`` raises ``EventTooLarge`` carrying the items completed earlier in the
    same chunk, and the decoder refuses further input.
    """

    __slots__ = (
        "_block_bytes",
        "_data",
        "_event",
        "_failed",
        "_has_fields",
        "_id",
        "_max",
        "_partial",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._max = max_event_bytes
        self._partial = b""
        self._skip_lf = False
        self._started = False
        self._failed = False
        self._reset_block()

    def _reset_block(self) -> None:
        self._data: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._has_fields = False
        self._block_bytes = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the event being assembled (complete lines plus the unfinished one)."""
        return self._block_bytes + len(self._partial)

    def feed(self, chunk: bytes) -> list[Item]:
        if self._failed:
            raise EventTooLarge(self._max, [])
        if not chunk:
            return []
        if not self._started:
            # The BOM is only meaningful as the stream's first bytes; wait until 3 bytes are in.
            pending = self._partial + chunk
            if len(pending) < len(_BOM) and _BOM.startswith(pending):
                self._partial = pending
                return []
            self._started = True
            self._partial = b""
            chunk = pending[len(_BOM) :] if pending.startswith(_BOM) else pending
            if not chunk:
                return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        buf = self._partial + chunk if self._partial else chunk
        lines: list[bytes]
        if b"\r" in buf:
            lines = buf.splitlines(keepends=True)
            last = lines[-1]
            if last[-1:] in (b"\n", b"\r"):
                self._partial = b""
                # A trailing CR may be the first half of a CRLF split across chunks.
                self._skip_lf = last[-1:] == b"\r"
            else:
                self._partial = lines.pop()
            lines = [raw.rstrip(b"\r\n") for raw in lines]
        else:
            # LF only (what nearly every server sends): one split, the unfinished line last.
            lines = buf.split(b"\n")
            self._partial = lines.pop()
        out: list[Item] = []
        for line in lines:
            # Comments are not part of the event, so they do not count against its size budget;
            # a comment line is bounded on its own, as its unfinished prefix is below.
            if line[:1] != b":":
                # Every line ending counts as one byte, so a CRLF split across chunks (whose LF
                # is skipped) costs the same as one that arrives whole.
                self._block_bytes += len(line) + 1
                if self._block_bytes > self._max:
                    self._fail()
                    raise EventTooLarge(self._max, out)
                if line[:5] == b"data:":
                    # The field of nearly every line, parsed without the general path (the
                    # prefix is ASCII, so decoding the value alone decodes it the same).
                    value = (line[6:] if line[5:6] == b" " else line[5:]).decode("utf-8", "replace")
                    if self._data is None:
                        self._data = [value]
                    else:
                        self._data.append(value)
                    self._has_fields = True
                    continue
            elif len(line) > self._max:
                self._fail()
                raise EventTooLarge(self._max, out)
            item = self._line(line)
            if item is not None:
                out.append(item)
        pending_cost = len(self._partial)
        if self._partial[:1] != b":":
            pending_cost += self._block_bytes
        if pending_cost > self._max:
            self._fail()
            raise EventTooLarge(self._max, out)
        return out

    def _fail(self) -> None:
        self._failed = True
        self._partial = b""
        self._reset_block()

    def _line(self, raw: bytes) -> Item | None:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return Comment(line[1:])
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        else:
            # Unknown fields are ignored by the spec; an empty block must still not dispatch.
            return None
        self._has_fields = True
        return None

    def _dispatch(self) -> Event | None:
        if not self._has_fields:
            self._block_bytes = 0
            return None
        lines = self._data
        data = None if lines is None else lines[0] if len(lines) == 1 else "\n".join(lines)
        ev = Event(data, self._event, self._id, self._retry)
        self._reset_block()
        return ev

    def flush(self) -> bytes:
        """At end of stream: forget the unfinished event (the spec discards it).

        Returns the bytes of the unfinished last line, for diagnostics; complete lines of the
        unfinished event are not kept.
        """
        leftover = self._partial
        self._partial = b""
        self._reset_block()
        return leftover


def encode_event(
    data: str | None,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """Serialise one event; multi-line data becomes several ``data:`` lines."""
    if (
        event is None
        and retry is None
        and id is not None
        and data is not None
        and "\n" not in data
        and "\r" not in data
    ):
        # The shape of nearly every stored event, in one step.
        return f"id: {id}\ndata: {data}\n\n".encode()
    parts: list[str] = []
    if event is not None:
        parts.append(f"event: {event}\n")
    if id is not None:
        parts.append(f"id: {id}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    if data is not None:
        if "\n" in data or "\r" in data:
            parts.extend(f"data: {line}\n" for line in _NEWLINES.split(data))
        else:
            parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_comment(text: str) -> bytes:
    """One comment line, without a blank line after it.

    A blank line dispatches an event in a client's decoder. The SDKs' decoders (openai,
    letta-client: httpx-sse's) keep the last event id across events, as the spec says, and so
    dispatch an event with empty data for a blank line that follows a comment once an ``id:``
    was seen; they then fail to parse it as JSON. A lone comment line is skipped by every
    decoder, wherever it comes.
    """
    return b":" + _NEWLINES.sub(" ", text).encode() + b"\n"
