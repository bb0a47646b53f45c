"""Tests for ``sidecar.inflate``: bounded, incremental gzip/deflate decoding of upstream bodies."""

from __future__ import annotations

import gzip
import itertools
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import CorruptEncoding, DecompressedTooLarge
from sidecar.inflate import PIECE_BYTES, Inflater, content_coding, decodable

CODINGS = ["gzip", "x-gzip", "deflate"]


def compress(coding: str, raw: bytes, level: int = 6) -> bytes:
    if coding == "deflate":
        return zlib.compress(raw, level)
    return gzip.compress(raw, compresslevel=level)


def chunks_of(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def pieces(inflater: Inflater, chunks: list[bytes]) -> list[bytes]:
    return [piece for chunk in chunks for piece in inflater.feed(chunk)]


@pytest.mark.parametrize(
    ("header", "coding"),
    [
        (None, "identity"),
        ("", "identity"),
        (" GZIP ", "gzip"),
        ("Deflate", "deflate"),
        ("br", "br"),
    ],
)
def test_content_coding_is_normalized(header: str | None, coding: str) -> None:
    assert content_coding(header) == coding


@pytest.mark.parametrize(
    ("coding", "ok"),
    [
        ("identity", True),
        ("gzip", True),
        ("x-gzip", True),
        ("deflate", True),
        ("br", False),
        ("zstd", False),
        ("gzip, gzip", False),
        ("compress", False),
    ],
)
def test_decodable(coding: str, ok: bool) -> None:
    assert decodable(coding) is ok


def test_an_unknown_coding_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="br"):
        Inflater("br", max_bytes=10)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.binary(max_size=3000) | st.sampled_from([b"data: x\n\n" * 2000, b"a" * 50_000]),
    coding=st.sampled_from(CODINGS),
    piece=st.integers(min_value=1, max_value=4096),
    data=st.data(),
)
def test_any_chunking_decodes_to_the_same_bytes_in_bounded_pieces(
    raw: bytes, coding: str, piece: int, data: st.DataObject
) -> None:
    wire = compress(coding, raw)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=10))
    inflater = Inflater(coding, max_bytes=len(raw), piece_bytes=piece)
    out = pieces(inflater, chunks_of(wire, cuts))
    assert b"".join(out) == raw
    assert all(0 < len(p) <= piece for p in out)
    assert inflater.decoded_bytes == len(raw)


def test_identity_passes_chunks_through() -> None:
    inflater = Inflater("identity", max_bytes=1)
    assert pieces(inflater, [b"data: a\n\n", b"", b"data: b\n\n"]) == [
        b"data: a\n\n",
        b"data: b\n\n",
    ]


def test_one_chunk_is_decoded_lazily_piece_by_piece() -> None:
    # 40 MB of zeros in about 40 KB: taking one piece decodes one piece, not the whole bomb.
    bomb = compress("gzip", bytes(40 << 20), level=9)
    inflater = Inflater("gzip", max_bytes=1 << 40)
    decoded = inflater.feed(bomb)
    assert len(next(decoded)) == PIECE_BYTES
    assert inflater.decoded_bytes == PIECE_BYTES
    assert len(next(decoded)) == PIECE_BYTES
    assert inflater.decoded_bytes == 2 * PIECE_BYTES


@pytest.mark.parametrize("coding", CODINGS)
def test_past_the_cap_exactly_the_cap_is_produced_then_it_raises(coding: str) -> None:
    raw = b"data: x\n\n" * 100_000
    inflater = Inflater(coding, max_bytes=123_457, piece_bytes=10_000)
    out = bytearray()

    def drain() -> None:
        for piece in inflater.feed(compress(coding, raw)):
            out.extend(piece)

    with pytest.raises(DecompressedTooLarge, match=r"max_decompressed_bytes \(123457 bytes\)"):
        drain()
    assert bytes(out) == raw[:123_457]
    assert inflater.decoded_bytes == 123_457


def test_a_stream_of_exactly_the_cap_passes() -> None:
    raw = b"z" * 5000
    assert b"".join(pieces(Inflater("gzip", max_bytes=5000), [compress("gzip", raw)])) == raw


def test_the_cap_counts_the_whole_stream_not_one_chunk() -> None:
    raw = b"y" * 3000
    wire = compress("deflate", raw)
    inflater = Inflater("deflate", max_bytes=2999)
    with pytest.raises(DecompressedTooLarge):
        pieces(inflater, [wire[i : i + 7] for i in range(0, len(wire), 7)])


@pytest.mark.parametrize("cut", [1, 2, 5, 10])
def test_gzip_members_are_concatenated_whatever_the_cut(cut: int) -> None:
    first = gzip.compress(b"data: one\n\n")
    wire = first + gzip.compress(b"data: two\n\n")
    split = len(first) + cut - 5
    inflater = Inflater("gzip", max_bytes=1 << 20)
    assert b"".join(pieces(inflater, [wire[:split], wire[split:]])) == b"data: one\n\ndata: two\n\n"


@pytest.mark.parametrize(
    ("coding", "wire"),
    [
        ("gzip", b"this is not gzip at all"),
        ("deflate", b"\x00\x01\x02 nor zlib"),
        ("gzip", gzip.compress(b"data: a\n\n") + b"trailing garbage"),
        ("deflate", zlib.compress(b"data: a\n\n") + b"x"),
    ],
)
def test_corrupt_data_raises_corrupt_encoding(coding: str, wire: bytes) -> None:
    with pytest.raises(CorruptEncoding, match=coding):
        pieces(Inflater(coding, max_bytes=1 << 20), [wire])


def test_a_truncated_stream_gives_what_it_holds_without_error() -> None:
    raw = b"data: x\n\n" * 1000
    wire = compress("gzip", raw, level=1)
    out = b"".join(pieces(Inflater("gzip", max_bytes=1 << 20), [wire[: len(wire) // 2]]))
    assert raw.startswith(out)
    assert out


@pytest.mark.parametrize("coding", CODINGS)
def test_what_decoded_before_corrupt_bytes_in_the_same_chunk_is_kept(coding: str) -> None:
    # zlib drops the output of a call that fails; the inflater still gives it, byte-exact.
    raw = b"".join(b"data: event %d\n\n" % i for i in range(500))
    wbits = {"deflate": zlib.MAX_WBITS, "gzip": 31, "x-gzip": 31}[coding]
    z = zlib.compressobj(wbits=wbits)
    good = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
    out = bytearray()

    def drain() -> None:
        # \xff starts a block of type 3, which does not exist: an error right there.
        for piece in Inflater(coding, max_bytes=1 << 20, piece_bytes=1000).feed(good + b"\xff!"):
            out.extend(piece)

    with pytest.raises(CorruptEncoding, match="invalid block type"):
        drain()
    assert bytes(out) == raw
