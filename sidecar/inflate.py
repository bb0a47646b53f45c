"""Bounded, incremental decoding of a compressed upstream body (gzip, deflate). Pure: no I/O.

A compressed event stream is a decompression bomb waiting to happen: 130 KB of gzip can decode to
130 MB. ``Inflater.feed`` therefore never produces more than ``piece_bytes`` per zlib call
(``max_length``; what zlib has not consumed yet waits in ``unconsumed_tail``), yields the pieces one
by one so that the caller can give the event loop a turn between them, and raises
``DecompressedTooLarge`` once the whole stream has decoded to more than ``max_bytes``. Memory held
here is one piece plus zlib's own window, whatever the input.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from sidecar.errors import CorruptEncoding, DecompressedTooLarge

# What one decoding step may produce: small enough that relaying its events takes a few
# milliseconds, large enough that a legitimate stream costs few steps.
PIECE_BYTES = 16 << 10

_GZIP = 16 + zlib.MAX_WBITS  # gzip header and trailer
_ZLIB = zlib.MAX_WBITS  # HTTP's "deflate" is the zlib format (RFC 9110 section 8.4.1.2)
WBITS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}
IDENTITY = "identity"


def content_coding(header: str | None) -> str:
    """The normalized Content-Encoding of a response ("identity" when there is none)."""
    value = (header or "").strip().lower()
    return value or IDENTITY


def decodable(coding: str) -> bool:
    """Whether the tee can read an event stream sent with this (normalized) content coding."""
    return coding == IDENTITY or coding in WBITS


def narrow_accept_encoding(values: list[str]) -> str:
    """A request's Accept-Encoding reduced to the codings the tee decodes (q-values kept);
    ``identity`` when none is left. ``*`` goes too: it would let the upstream pick any coding."""
    kept = [
        part.strip()
        for value in values
        for part in value.split(",")
        if decodable(part.split(";", 1)[0].strip().lower())
    ]
    return ", ".join(kept) or IDENTITY


class Inflater:
    """Decodes one response body; identity passes through (the upstream's chunks are bounded
    by the socket reads already)."""

    __slots__ = ("_coding", "_max", "_piece", "_total", "_z")

    def __init__(self, coding: str, *, max_bytes: int, piece_bytes: int = PIECE_BYTES) -> None:
        if not decodable(coding):
            raise ValueError(f"cannot decode content coding {coding!r}")
        self._coding = coding
        self._max = max_bytes
        self._piece = piece_bytes
        self._total = 0
        self._z = zlib.decompressobj(WBITS[coding]) if coding in WBITS else None

    @property
    def identity(self) -> bool:
        """The body passes through as it comes (no content coding)."""
        return self._z is None

    @property
    def decoded_bytes(self) -> int:
        return self._total

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data``, each at most ``piece_bytes`` long.

        Raises ``DecompressedTooLarge`` (after yielding exactly ``max_bytes`` in all) and
        ``CorruptEncoding`` (after yielding what decoded before the first bad byte); either way
        the stream cannot go on.
        """
        if self._z is None:
            if data:
                yield data
            return
        pending = data
        while True:
            if self._z.eof:
                # Bytes after the end of the compressed data: another gzip member is legal
                # (RFC 1952; zlib checks its header), anything after a zlib stream is not.
                pending = self._z.unused_data + pending
                if not pending:
                    return
                if self._coding == "deflate":
                    raise CorruptEncoding(self._coding, "data after the end of the stream")
                self._z = zlib.decompressobj(WBITS[self._coding])
            before = self._z.copy()
            try:
                out = self._z.decompress(pending, self._piece)
            except zlib.error as exc:
                # zlib drops what a failing call decoded: what came before the bad byte was
                # sent all the same, so find it byte by byte from the state before the call.
                yield from self._salvage(before, pending)
                raise CorruptEncoding(self._coding, str(exc)) from None
            pending = self._z.unconsumed_tail
            yield from self._counted(out)
            # A full piece may mean zlib holds more output even with no input left.
            if not pending and len(out) < self._piece and not self._z.eof:
                return

    def _counted(self, out: bytes) -> Iterator[bytes]:
        if not out:
            return
        room = self._max - self._total
        if len(out) > room:
            self._total = self._max
            if room:
                yield out[:room]
            raise DecompressedTooLarge(self._max)
        self._total += len(out)
        yield out

    def _salvage(self, z: Any, data: bytes) -> Iterator[bytes]:
        for i in range(len(data)):
            tail = data[i : i + 1]
            while tail:
                try:
                    out = z.decompress(tail, self._piece)
                except zlib.error:
                    return
                tail = z.unconsumed_tail
                yield from self._counted(out)
