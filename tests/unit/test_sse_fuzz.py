"""Fuzzing the SSE decoder and the bounded inflater that feeds it (issue 11): arbitrary bytes, any
chunking. The items never depend on the chunking, and the decoder never holds more than twice its
bound (an event's lines and an unfinished comment line are bounded each on their own).

A time budget for CI: ``SSE_FUZZ_EXAMPLES`` examples per property (default 300, a few seconds in
all); ``make fuzz`` runs 20,000.
"""

from __future__ import annotations

import itertools
import os
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.errors import EventTooLarge
from sidecar.inflate import Inflater
from sidecar.sse import Item, SSEDecoder

EXAMPLES = int(os.environ.get("SSE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What a parser cares about, mixed with anything at all.
_TOKENS = [
    b"data:",
    b"data: ",
    b"event: ",
    b"id: ",
    b"retry: ",
    b":",
    b" ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xe2\x82",
    b"\xff",
    b"[DONE]",
    b"123",
]
streams = st.one_of(
    st.binary(max_size=4096),
    st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=16), max_size=300).map(b"".join),
)


def cuts(data: st.DataObject, length: int) -> list[int]:
    return sorted(data.draw(st.lists(st.integers(0, length), max_size=40)))


def chunked(raw: bytes, at: list[int]) -> list[bytes]:
    return [raw[a:b] for a, b in itertools.pairwise([0, *at, len(raw)])]


def run(chunks: list[bytes], limit: int) -> tuple[list[Item], bool, bytes]:
    """Items (completed ones included when it fails), whether it failed, the unfinished line;
    after every feed, the decoder holds at most twice ``limit`` bytes (what this fuzzer found:
    an event at its limit plus a comment line at its own, or a BOM's first 2 bytes)."""
    decoder = SSEDecoder(limit)
    items: list[Item] = []
    for chunk in chunks:
        try:
            items.extend(decoder.feed(chunk))
        except EventTooLarge as exc:
            items.extend(exc.completed)
            assert decoder.buffered_bytes == 0
            return items, True, b""
        # An event's lines and an unfinished comment line are bounded each on their own; at the
        # stream's start it may hold the two bytes of a BOM it has not seen whole.
        assert decoder.buffered_bytes <= max(2 * limit, 2)
    return items, False, decoder.flush()


@FUZZ
@given(raw=streams, limit=st.integers(1, 600), data=st.data())
def test_the_items_never_depend_on_the_chunking_and_memory_stays_bounded(
    raw: bytes, limit: int, data: st.DataObject
) -> None:
    whole = run([raw], limit)
    assert run(chunked(raw, cuts(data, len(raw))), limit) == whole
    assert run(chunked(raw, cuts(data, len(raw))), limit) == whole


@FUZZ
@given(raw=streams, coding=st.sampled_from(["gzip", "deflate"]), data=st.data())
def test_a_compressed_stream_decodes_to_the_same_items_whatever_its_chunking(
    raw: bytes, coding: str, data: st.DataObject
) -> None:
    z = zlib.compressobj(wbits=31 if coding == "gzip" else zlib.MAX_WBITS)
    wire = z.compress(raw) + z.flush()
    piece = data.draw(st.integers(1, 512))
    inflater = Inflater(coding, max_bytes=len(raw), piece_bytes=piece)
    decoded = []
    for chunk in chunked(wire, cuts(data, len(wire))):
        for out in inflater.feed(chunk):
            assert 0 < len(out) <= piece
            decoded.append(out)
    assert b"".join(decoded) == raw
    assert run(decoded, 1 << 20) == run([raw], 1 << 20)
