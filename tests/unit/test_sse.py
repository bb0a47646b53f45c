"""Tests for ``sidecar.sse``: the incremental WHATWG server-sent-events decoder and the encoders."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.errors import EventTooLarge, SSEError
from sidecar.sse import Comment, Event, Item, SSEDecoder, encode_comment, encode_event

BOM = b"\xef\xbb\xbf"
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def split_at(raw: bytes, cuts: list[int] | tuple[int, ...]) -> list[bytes]:
    """``raw`` cut at the given offsets (sorted, duplicates allowed: they give empty chunks)."""
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> tuple[list[Item], bytes]:
    """Feed every chunk to a fresh decoder; the items in order and what ``flush`` returns."""
    decoder = SSEDecoder(max_event_bytes)
    items: list[Item] = []
    for chunk in chunks:
        items.extend(decoder.feed(chunk))
    return items, decoder.flush()


def decode_whole(raw: bytes) -> list[Item]:
    items, leftover = decode([raw])
    assert leftover == b""
    return items


@dataclass(frozen=True)
class Outcome:
    """Everything observable from feeding a stream: items (incl. ``completed``), error, leftover."""

    items: list[Item]
    too_large: bool
    leftover: bytes


def outcome(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> Outcome:
    decoder = SSEDecoder(max_event_bytes)
    items: list[Item] = []
    for chunk in chunks:
        error: EventTooLarge | None = None
        try:
            items.extend(decoder.feed(chunk))
        except EventTooLarge as exc:
            error = exc
        if error is not None:
            assert error.limit == max_event_bytes
            items.extend(error.completed)
            # Once failed, the decoder refuses every further chunk, even an empty one.
            with pytest.raises(EventTooLarge):
                decoder.feed(b"data: more\n\n")
            with pytest.raises(EventTooLarge):
                decoder.feed(b"")
            return Outcome(items, True, b"")
    return Outcome(items, False, decoder.flush())


_LINE_END = re.compile(rb"\r\n|\r|\n")


def reference(raw: bytes, max_event_bytes: int = 1 << 20) -> Outcome:
    """A whole-stream model of the decoder, written straight from the WHATWG parsing rules plus
    the sidecar's choices (blocks without data still yield an Event; ids are per block; each line
    ending costs one byte against the limit; comments are bounded on their own)."""
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    *lines, leftover = _LINE_END.split(raw)
    items: list[Item] = []
    data: list[str] | None = None
    event: str | None = None
    id_: str | None = None
    retry: int | None = None
    fields = False
    cost = 0
    for line_bytes in lines:
        if line_bytes.startswith(b":"):
            if len(line_bytes) > max_event_bytes:
                return Outcome(items, True, b"")
        else:
            cost += len(line_bytes) + 1
            if cost > max_event_bytes:
                return Outcome(items, True, b"")
        line = line_bytes.decode("utf-8", "replace")
        if line == "":
            if fields:
                joined = None if data is None else "\n".join(data)
                items.append(Event(joined, event, id_, retry))
            data, event, id_, retry, fields, cost = None, None, None, None, False, 0
            continue
        if line.startswith(":"):
            items.append(Comment(line[1:]))
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data = [*(data or []), value]
        elif name == "event":
            event = value
        elif name == "id":
            if "\0" not in value:
                id_ = value
        elif name == "retry":
            if re.fullmatch(r"[0-9]+", value):
                retry = int(value)
        else:
            continue
        fields = True
    pending = len(leftover) if leftover.startswith(b":") else cost + len(leftover)
    if pending > max_event_bytes:
        return Outcome(items, True, b"")
    return Outcome(items, False, leftover)


# --------------------------------------------------------------------------------------------
# WHATWG parsing rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_each_line_ending(eol: bytes) -> None:
    raw = eol.join([b"event: a", b"data: 1", b"data: 2", b"", b"id: 9", b"data: x", b"", b""])
    assert decode_whole(raw) == [Event("1\n2", event="a"), Event("x", id="9")]


def test_mixed_line_endings_in_one_stream() -> None:
    raw = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r: e\n\n"
    assert decode_whole(raw) == [Event("a\nb\nc"), Event("d"), Comment(" e")]


def test_lf_cr_is_two_line_endings_not_one() -> None:
    # Only CR followed by LF pairs up; LF followed by CR is two endings, i.e. a blank line.
    assert decode_whole(b"data: a\n\rdata: b\n\n") == [Event("a"), Event("b")]


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # Were the LF a second line ending, this blank line would dispatch "a" alone.
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [Event("a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: c\n\n") == [Event("c")]
    assert decoder.flush() == b""


def test_cr_at_chunk_end_survives_an_empty_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == [Event("a")]


def test_cr_at_chunk_end_then_cr_is_a_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [Event("a")]
    # That second CR may itself be the first half of a CRLF: the LF is skipped, not a blank line.
    assert decoder.feed(b"\ndata: b\n\n") == [Event("b")]


def test_cr_at_chunk_end_then_other_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\r") == [Event("a\nb")]


def test_lf_after_cr_is_only_skipped_right_after_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"x") == []
    # This LF ends the line "x" (an unknown field), it is not the tail of the earlier CR.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [Event("a")]


def test_multi_line_data_joined_with_newline() -> None:
    raw = b"data: first\ndata:second\ndata\ndata: \ndata: last\n\n"
    assert decode_whole(raw) == [Event("first\nsecond\n\n\nlast")]


@pytest.mark.parametrize(
    "line", [b"data:", b"data: ", b"data"], ids=["colon", "colon-space", "no-colon"]
)
def test_empty_data_dispatches_empty_string(line: bytes) -> None:
    assert decode_whole(line + b"\n\n") == [Event("")]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"retry: 3000\n\n", Event(None, retry=3000)),
        (b"id: 42\n\n", Event(None, id="42")),
        (b"event: ping\n\n", Event(None, event="ping")),
        (b"event\n\n", Event(None, event="")),
        (b"id\n\n", Event(None, id="")),
        (b"id:\n\n", Event(None, id="")),
        (b"event: a\nid: 1\nretry: 5\n\n", Event(None, event="a", id="1", retry=5)),
        (b"retry: soon\n\n", Event(None)),
        (b"id: a\x00b\n\n", Event(None)),
    ],
)
def test_block_without_data_yields_event_with_data_none(raw: bytes, expected: Event) -> None:
    assert decode_whole(raw) == [expected]


def test_all_fields_in_one_block() -> None:
    raw = b"event: delta\nid: 7\nretry: 250\ndata: x\n\n"
    assert decode_whole(raw) == [Event("x", event="delta", id="7", retry=250)]


def test_later_field_values_override_earlier_ones() -> None:
    raw = b"event: a\nevent: b\nid: 1\nid: 2\nretry: 1\nretry: 2\ndata: x\n\n"
    assert decode_whole(raw) == [Event("x", event="b", id="2", retry=2)]


def test_fields_do_not_leak_into_the_next_block() -> None:
    raw = b"event: a\nid: 1\nretry: 9\ndata: x\n\ndata: y\n\n"
    assert decode_whole(raw) == [Event("x", event="a", id="1", retry=9), Event("y")]


def test_unknown_fields_are_ignored() -> None:
    raw = b"foo: bar\ndata: x\nDATA: no\nData: no\n data: no\nevent : no\nretries: 1\n\n"
    assert decode_whole(raw) == [Event("x")]


def test_block_of_only_unknown_fields_yields_nothing() -> None:
    assert decode_whole(b"foo: bar\nbaz\nx: 1\n\ndata: y\n\n") == [Event("y")]
    assert decode_whole(b"foo: bar\n\n") == []


def test_blank_lines_alone_yield_nothing() -> None:
    assert decode_whole(b"\n\n\r\n\r\r\n\n") == []
    assert decode_whole(b"\n\n\ndata: x\n\n\n\n") == [Event("x")]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"data: x", "x"),
        (b"data:x", "x"),
        (b"data:  x", " x"),
        (b"data:   x ", "  x "),
        (b"data:\tx", "\tx"),
        (b"data: x:y: z", "x:y: z"),
        (b"data:: x", ": x"),
        (b"data: ", ""),
        (b"data:  ", " "),
    ],
)
def test_only_one_leading_space_is_stripped(line: bytes, value: str) -> None:
    assert decode_whole(line + b"\n\n") == [Event(value)]


def test_leading_space_rule_applies_to_every_field() -> None:
    raw = b"event:  e\nid:  1\ndata:d\n\n"
    assert decode_whole(raw) == [Event("d", event=" e", id=" 1")]


def test_id_containing_nul_is_ignored() -> None:
    assert decode_whole(b"id: 1\nid: 2\x00\ndata: x\n\n") == [Event("x", id="1")]
    assert decode_whole(b"id: \x00\ndata: x\n\n") == [Event("x")]
    # NUL elsewhere is ordinary text.
    assert decode_whole(b"data: a\x00b\nevent: c\x00\n\n") == [Event("a\x00b", event="c\x00")]


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b" 1",
        b"1 ",
        b"-1",
        b"+1",
        b"1.5",
        b"1e3",
        b"0x10",
        b"ten",
        "\u0661\u0662".encode(),  # Arabic-Indic digits: str.isdigit() is true, not ASCII
        "\uff11".encode(),  # fullwidth digit one
        "\u00b2".encode(),  # superscript two
    ],
)
def test_retry_with_non_digits_is_ignored(value: bytes) -> None:
    assert decode_whole(b"retry: 7\nretry: " + value + b"\ndata: x\n\n") == [Event("x", retry=7)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"0", 0), (b"007", 7), (b"123456789012345678901", 123456789012345678901)],
)
def test_retry_digits(value: bytes, expected: int) -> None:
    assert decode_whole(b"retry:" + value + b"\n\n") == [Event(None, retry=expected)]


def test_bom_at_stream_start_is_stripped() -> None:
    assert decode_whole(BOM + b"data: x\n\n") == [Event("x")]
    assert decode_whole(BOM + b": c\n") == [Comment(" c")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bom_split_across_chunks_is_stripped(cut: int) -> None:
    raw = BOM + b"data: x\n\n"
    assert decode([raw[:cut], raw[cut:]]) == ([Event("x")], b"")


def test_bom_fed_byte_by_byte_is_stripped() -> None:
    raw = BOM + b"data: x\n\n"
    decoder = SSEDecoder()
    got: list[Item] = []
    for i in range(len(raw)):
        got.extend(decoder.feed(raw[i : i + 1]))
    assert got == [Event("x")]


def test_bom_only_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(BOM) == []
    assert decoder.feed(b"data: x\n\n") == [Event("x")]


def test_only_one_bom_is_stripped() -> None:
    # The second BOM becomes part of the first line's field name, which is then unknown.
    assert decode_whole(BOM + BOM + b"data: x\n\ndata: y\n\n") == [Event("y")]


def test_bom_later_in_the_stream_is_not_stripped() -> None:
    assert decode_whole(b"data: x\n\n" + BOM + b"data: y\n\ndata: z\n\n") == [
        Event("x"),
        Event("z"),
    ]
    assert decode_whole(b"data: " + BOM + b"v\n\n") == [Event("\ufeffv")]
    # A BOM in a second chunk is not at the stream start either.
    assert decode([b"data: x\n\n", BOM + b"data: y\n\ndata: z\n\n"])[0] == [
        Event("x"),
        Event("z"),
    ]


def test_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb") == []
    assert decoder.buffered_bytes == 2
    assert decoder.feed(b"X") == []
    assert decoder.flush() == b"\xef\xbbX"
    # A first chunk that starts like a BOM but diverges is kept too.
    assert decode([b"\xef\xbbdata: x\n\n"]) == ([], b"")
    assert decode([b"\xef", b":c\n"]) == ([], b"")  # one line, field "\ufffd"
    assert decode([b"\xef", b"\ndata: x\n\n"]) == ([Event("x")], b"")


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"a\xffb", "a\ufffdb"),
        (b"\xe2\x82", "\ufffd"),
        (b"\xe2\x82x", "\ufffdx"),
        (b"\xc0\xaf", "\ufffd\ufffd"),
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),
        (b"\x80\x80", "\ufffd\ufffd"),
        (b"\xf0\x9f\x98", "\ufffd"),
    ],
)
def test_invalid_utf8_is_replaced(payload: bytes, value: str) -> None:
    assert decode_whole(b"data: " + payload + b"\n\n") == [Event(value)]
    assert decode_whole(b":" + payload + b"\n") == [Comment(value)]


def test_multibyte_characters_split_across_chunks() -> None:
    text = "é€😀你"
    raw = ("data: " + text + "\n\n").encode()
    for cut in range(len(raw) + 1):
        assert decode([raw[:cut], raw[cut:]]) == ([Event(text)], b""), cut
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == ([Event(text)], b"")


def test_comment_yielded_as_soon_as_its_line_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": ping") == []
    assert decoder.feed(b"\n") == [Comment(" ping")]
    assert decoder.feed(b":\r") == [Comment("")]
    assert decoder.feed(b"\n::x\r\n") == [Comment(":x")]
    assert decoder.feed(b":no-space\n") == [Comment("no-space")]


def test_comment_in_the_middle_of_an_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: e\ndata: a\n: keepalive\n") == [Comment(" keepalive")]
    assert decoder.feed(b"data: b\n: two\n") == [Comment(" two")]
    assert decoder.feed(b"\n") == [Event("a\nb", event="e")]


def test_comment_does_not_make_a_block_dispatch() -> None:
    assert decode_whole(b": a\n\n: b\n\n") == [Comment(" a"), Comment(" b")]


def test_items_come_out_in_stream_order() -> None:
    raw = b": 1\ndata: a\n: 2\n\n: 3\ndata: b\n\n"
    assert decode_whole(raw) == [
        Comment(" 1"),
        Comment(" 2"),
        Event("a"),
        Comment(" 3"),
        Event("b"),
    ]


def test_event_without_final_blank_line_is_not_yielded() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\ndata: c") == [Event("a")]
    assert decoder.flush() == b"data: c"
    # flush discards the unfinished block: a blank line afterwards dispatches nothing.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: d\n\n") == [Event("d")]


def test_flush_after_complete_lines_of_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: e\ndata: a\n") == []
    assert decoder.flush() == b""
    assert decoder.feed(b"\n") == []


def test_flush_on_a_clean_stream_is_empty() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\n") == [Event("a")]
    assert decoder.flush() == b""
    assert SSEDecoder().flush() == b""


def test_empty_chunks_are_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n\n") == [Event("a")]
    assert decoder.feed(b"") == []


def test_buffered_bytes() -> None:
    decoder = SSEDecoder()
    assert decoder.buffered_bytes == 0
    decoder.feed(b"data: ab\ndat")
    assert decoder.buffered_bytes == len(b"data: ab\n") + 3
    decoder.feed(b"a: c\r\n")
    # Every line ending counts as one byte.
    assert decoder.buffered_bytes == len(b"data: ab\n") + len(b"data: c\n")
    decoder.feed(b": a comment does not count\n")
    assert decoder.buffered_bytes == len(b"data: ab\n") + len(b"data: c\n")
    assert decoder.feed(b"\n") == [Event("ab\nc")]
    assert decoder.buffered_bytes == 0
    decoder.feed(b"foo: bar\n")
    assert decoder.buffered_bytes == len(b"foo: bar\n")
    assert decoder.feed(b"\n") == []
    assert decoder.buffered_bytes == 0


def test_event_and_comment_values() -> None:
    assert Event("x") == Event(data="x", event=None, id=None, retry=None)
    assert Event("x") != Event("x", event="message")
    assert Comment("a") != Comment(" a")


# --------------------------------------------------------------------------------------------
# every split point of real-looking streams
# --------------------------------------------------------------------------------------------

LETTA = (
    b'data: {"message_type":"reasoning_message","reasoning":"The user says hi."}\n\n'
    b": ping\n\n"
    b'data: {"message_type":"assistant_message","content":"Hello! How can I help?"}\n\n'
    b'data: {"message_type":"stop_reason","stop_reason":"end_turn"}\n\n'
    b'data: {"message_type":"usage_statistics","completion_tokens":12}\n\n'
    b"data: [DONE]\n\n"
)
LETTA_ITEMS: list[Item] = [
    Event('{"message_type":"reasoning_message","reasoning":"The user says hi."}'),
    Comment(" ping"),
    Event('{"message_type":"assistant_message","content":"Hello! How can I help?"}'),
    Event('{"message_type":"stop_reason","stop_reason":"end_turn"}'),
    Event('{"message_type":"usage_statistics","completion_tokens":12}'),
    Event("[DONE]"),
]

LETTA_ERROR = (
    b'data: {"message_type":"assistant_message","content":"Partial"}\n\n'
    b'data: {"message_type":"stop_reason","stop_reason":"llm_api_error"}\n\n'
    b"event: error\n"
    b'data: {"error_type":"llm_api_error","message":"Rate limited","detail":"retry later"}\n\n'
    b"data: [DONE]\n\n"
)
LETTA_ERROR_ITEMS: list[Item] = [
    Event('{"message_type":"assistant_message","content":"Partial"}'),
    Event('{"message_type":"stop_reason","stop_reason":"llm_api_error"}'),
    Event(
        '{"error_type":"llm_api_error","message":"Rate limited","detail":"retry later"}',
        event="error",
    ),
    Event("[DONE]"),
]

UNICODE_BOM = (
    BOM
    + (
        "id: 1\nevent: message\n"
        'data: {"content":"héllo wörld — 你好 😀"}\n\n'
        ": ñ✓\n"
        "retry: 1000\n"
        "data: line one\n"
        "data: ligne deux ∑\n\n"
        "data: [DONE]\n\n"
    ).encode()
)
UNICODE_BOM_ITEMS: list[Item] = [
    Event('{"content":"héllo wörld — 你好 😀"}', event="message", id="1"),
    Comment(" ñ✓"),
    Event("line one\nligne deux ∑", retry=1000),
    Event("[DONE]"),
]

MIXED = b": hi\revent: a\r\ndata: 1\rdata: 2\n\r\nid: 5\ndata\r\rfoo: bar\r\n\r\ndata: end\r\n\r\n"
MIXED_ITEMS: list[Item] = [
    Comment(" hi"),
    Event("1\n2", event="a"),
    Event("", id="5"),
    Event("end"),
]


def _with_endings(raw: bytes, eol: bytes) -> bytes:
    return raw.replace(b"\n", eol)


STREAMS: dict[str, tuple[bytes, list[Item]]] = {
    "letta-lf": (LETTA, LETTA_ITEMS),
    "letta-crlf": (_with_endings(LETTA, b"\r\n"), LETTA_ITEMS),
    "letta-cr": (_with_endings(LETTA, b"\r"), LETTA_ITEMS),
    "letta-error": (LETTA_ERROR, LETTA_ERROR_ITEMS),
    "letta-error-crlf": (_with_endings(LETTA_ERROR, b"\r\n"), LETTA_ERROR_ITEMS),
    "unicode-bom": (UNICODE_BOM, UNICODE_BOM_ITEMS),
    "unicode-bom-crlf": (_with_endings(UNICODE_BOM, b"\r\n"), UNICODE_BOM_ITEMS),
    "mixed-endings": (MIXED, MIXED_ITEMS),
}
STREAM_IDS = list(STREAMS)


@pytest.mark.parametrize("name", STREAM_IDS)
def test_stream_whole(name: str) -> None:
    raw, expected = STREAMS[name]
    assert decode([raw]) == (expected, b"")


@pytest.mark.parametrize("name", STREAM_IDS)
def test_stream_split_at_every_byte(name: str) -> None:
    raw, expected = STREAMS[name]
    for cut in range(len(raw) + 1):
        assert decode([raw[:cut], raw[cut:]]) == (expected, b""), cut


@pytest.mark.parametrize("name", STREAM_IDS)
def test_stream_byte_by_byte(name: str) -> None:
    raw, expected = STREAMS[name]
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == (expected, b"")


@pytest.mark.parametrize("name", STREAM_IDS)
def test_truncated_stream_split_at_every_byte(name: str) -> None:
    # Cut the stream short in the middle of its last event: whatever the chunking, the same items
    # come out and flush returns the same unfinished line.
    raw, _ = STREAMS[name]
    truncated = raw[: len(raw) - 7]
    whole = decode([truncated])
    assert whole[0] == reference(truncated).items
    assert whole[1] == reference(truncated).leftover
    for cut in range(len(truncated) + 1):
        assert decode([truncated[:cut], truncated[cut:]]) == whole, cut


SHORT_STREAMS: dict[str, tuple[bytes, list[Item]]] = {
    "short-lf": (
        BOM + ": p\ndata: é😀\n\nevent: error\ndata: x\n\n".encode(),
        [Comment(" p"), Event("é😀"), Event("x", event="error")],
    ),
    "short-crlf": (
        BOM + ": p\r\ndata: é😀\r\n\r\nid: 3\r\ndata: x\r\n\r\n".encode(),
        [Comment(" p"), Event("é😀"), Event("x", id="3")],
    ),
    "short-cr": (
        b"data: a\rdata: b\r\r: c\rretry: 5\r\r",
        [Event("a\nb"), Comment(" c"), Event(None, retry=5)],
    ),
}


@pytest.mark.parametrize("name", list(SHORT_STREAMS))
def test_short_stream_split_at_every_pair_of_points(name: str) -> None:
    raw, expected = SHORT_STREAMS[name]
    assert decode([raw]) == (expected, b"")
    for i, j in itertools.combinations_with_replacement(range(len(raw) + 1), 2):
        assert decode([raw[:i], raw[i:j], raw[j:]]) == (expected, b""), (i, j)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------

_NEWLINES = re.compile(r"\r\n|\r|\n")
single_line = st.text().map(lambda s: _NEWLINES.sub("", s))


@dataclass(frozen=True)
class EventSpec:
    data: str | None
    event: str | None
    id: str | int | None
    retry: int | None

    def encode(self) -> bytes:
        return encode_event(self.data, event=self.event, id=self.id, retry=self.retry)

    def expected(self) -> list[Item]:
        if self.data is None and self.event is None and self.id is None and self.retry is None:
            return []  # encodes to a lone blank line
        data = None if self.data is None else _NEWLINES.sub("\n", self.data)
        id_ = None if self.id is None else str(self.id)
        return [Event(data, event=self.event, id=id_, retry=self.retry)]


@dataclass(frozen=True)
class CommentSpec:
    text: str

    def encode(self) -> bytes:
        return encode_comment(self.text)

    def expected(self) -> list[Item]:
        return [Comment(_NEWLINES.sub(" ", self.text))]


event_specs = st.builds(
    EventSpec,
    data=st.none() | st.text() | st.lists(st.text(), min_size=2).map("\n".join),
    event=st.none() | single_line,
    id=st.none() | single_line.map(lambda s: s.replace("\0", "")) | st.integers(min_value=0),
    retry=st.none() | st.integers(min_value=0, max_value=10**15),
)
comment_specs = st.builds(CommentSpec, text=st.text())
item_specs = st.lists(st.one_of(event_specs, comment_specs), max_size=8)


def _random_cuts(data: st.DataObject, length: int) -> list[int]:
    return data.draw(st.lists(st.integers(min_value=0, max_value=length), max_size=12))


@PROPERTY_SETTINGS
@given(specs=item_specs, data=st.data())
def test_encoded_items_decode_to_the_same_items_in_any_chunking(
    specs: list[EventSpec | CommentSpec], data: st.DataObject
) -> None:
    raw = b"".join(spec.encode() for spec in specs)
    expected = [item for spec in specs for item in spec.expected()]
    assert decode([raw]) == (expected, b"")
    assert decode(split_at(raw, _random_cuts(data, len(raw)))) == (expected, b"")


@PROPERTY_SETTINGS
@given(spec=event_specs)
def test_single_event_round_trip_byte_by_byte(spec: EventSpec) -> None:
    raw = spec.encode()
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == (spec.expected(), b"")


@PROPERTY_SETTINGS
@given(spec=event_specs)
def test_encoded_event_fits_a_limit_of_its_own_size(spec: EventSpec) -> None:
    raw = spec.encode()
    assert outcome([raw], len(raw)) == Outcome(spec.expected(), False, b"")
    assert outcome([raw], len(raw) - 1).too_large


# Byte soup biased towards what matters to the parser.
_TOKENS = [
    b"data",
    b"event",
    b"id",
    b"retry",
    b"foo",
    b":",
    b": ",
    b" ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"12",
    b"x",
    BOM,
    b"\xef",
    b"\xbb",
    b"\xe2\x82",
    b"\xac",
    b"\xff",
    "é😀".encode(),
]
any_bytes = st.binary(max_size=200) | st.lists(
    st.sampled_from(_TOKENS) | st.binary(max_size=4), max_size=40
).map(b"".join)


@PROPERTY_SETTINGS
@given(raw=any_bytes, data=st.data())
def test_arbitrary_bytes_match_the_reference_in_any_chunking(
    raw: bytes, data: st.DataObject
) -> None:
    expected = reference(raw)
    assert not expected.too_large
    assert outcome([raw]) == expected
    assert outcome(split_at(raw, _random_cuts(data, len(raw)))) == expected


def _soup(max_tokens: int) -> st.SearchStrategy[bytes]:
    token = st.sampled_from(_TOKENS) | st.binary(max_size=4)
    return st.lists(token, max_size=max_tokens).map(b"".join)


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=24) | _soup(14), data=st.data())
def test_size_limit_does_not_depend_on_chunking(raw: bytes, data: st.DataObject) -> None:
    # Every limit from tiny to roomy, so the boundary cases are always exercised. Only
    # EventTooLarge may escape (outcome() lets anything else propagate), and the items, whether it
    # raised, and the leftover match the reference however the bytes are cut.
    cuts = _random_cuts(data, len(raw))
    for limit in range(2, len(raw) + 2):
        expected = reference(raw, limit)
        assert outcome([raw], limit) == expected, limit
        assert outcome(split_at(raw, cuts), limit) == expected, (limit, cuts)
        assert outcome([raw[i : i + 1] for i in range(len(raw))], limit) == expected, limit


# --------------------------------------------------------------------------------------------
# max event size
# --------------------------------------------------------------------------------------------


def test_event_over_the_limit_raises_with_completed_items() -> None:
    decoder = SSEDecoder(max_event_bytes=20)
    chunk = b": c\ndata: a\n\nevent: e\ndata: " + b"x" * 30 + b"\n\ndata: never\n\n"
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(chunk)
    assert info.value.limit == 20
    assert info.value.completed == [Comment(" c"), Event("a")]
    assert isinstance(info.value, SSEError)
    assert "20" in str(info.value)


def test_completed_only_holds_items_of_the_failing_chunk() -> None:
    decoder = SSEDecoder(max_event_bytes=20)
    assert decoder.feed(b"data: a\n\n") == [Event("a")]
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(b": c\ndata: " + b"y" * 20 + b"\n")
    assert info.value.completed == [Comment(" c")]


def test_event_growing_over_several_chunks_raises_on_the_chunk_that_crosses() -> None:
    decoder = SSEDecoder(max_event_bytes=30)
    assert decoder.feed(b"data: 0123456789\n") == []  # 17
    assert decoder.feed(b"data: 01234\n") == []  # 29
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(b": late\ndata: z\n")  # 37
    assert info.value.completed == [Comment(" late")]


def test_blank_line_counts_toward_the_event() -> None:
    raw = b"data: 0123456789\n\n"  # 18 bytes
    assert SSEDecoder(18).feed(raw) == [Event("0123456789")]
    with pytest.raises(EventTooLarge) as info:
        SSEDecoder(17).feed(raw)
    assert info.value.completed == []


def test_huge_line_without_newline_raises() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(EventTooLarge) as info:
        decoder.feed(b"data: " + b"x" * 100)
    assert info.value.completed == []


def test_partial_line_counts_exactly() -> None:
    decoder = SSEDecoder(max_event_bytes=50)
    assert decoder.feed(b"data: a\n") == []  # 8
    assert decoder.feed(b"x" * 42) == []  # 8 + 42 = 50: at the limit
    assert decoder.buffered_bytes == 50
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x")


def test_huge_line_fed_in_small_chunks_raises() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    for _ in range(142):  # 994 bytes
        assert decoder.feed(b"y" * 7) == []
    assert decoder.buffered_bytes == 994
    with pytest.raises(EventTooLarge):
        decoder.feed(b"y" * 7)  # 1001


def test_event_exactly_at_the_limit_passes() -> None:
    raw = encode_event("hello\nworld", event="e", id="1", retry=5)
    assert SSEDecoder(len(raw)).feed(raw) == [Event("hello\nworld", event="e", id="1", retry=5)]
    assert decode([raw[i : i + 1] for i in range(len(raw))], len(raw))[0] == [
        Event("hello\nworld", event="e", id="1", retry=5)
    ]
    with pytest.raises(EventTooLarge):
        SSEDecoder(len(raw) - 1).feed(raw)


def test_each_event_has_its_own_budget() -> None:
    one = encode_event("0123456789")
    decoder = SSEDecoder(len(one))
    assert decoder.feed(one * 5) == [Event("0123456789")] * 5


def test_crlf_line_endings_count_one_byte_whatever_the_chunking() -> None:
    raw = b"data: hello\r\n\r\n"  # counts as b"data: hello\n\n": 13
    for cut in range(len(raw) + 1):
        assert outcome([raw[:cut], raw[cut:]], 13) == Outcome([Event("hello")], False, b"")
        assert outcome([raw[:cut], raw[cut:]], 12).too_large


def test_comments_do_not_count_toward_the_limit() -> None:
    raw = b"data: a\n" + b": " + b"y" * 15 + b"\n" + b"data: b\n" + b":z\n" * 50 + b"\n"
    expected: list[Item] = [Comment(" " + "y" * 15), *[Comment("z")] * 50, Event("a\nb")]
    limit = len(b"data: a\ndata: b\n\n")  # 17
    assert outcome([raw], limit) == Outcome(expected, False, b"")
    for cut in range(len(raw) + 1):
        assert outcome([raw[:cut], raw[cut:]], limit) == Outcome(expected, False, b""), cut
    with pytest.raises(EventTooLarge):
        SSEDecoder(limit - 1).feed(raw)


def test_a_comment_line_is_bounded_on_its_own() -> None:
    ok = b":" + b"c" * 19 + b"\n"  # 20 bytes without its line ending
    assert outcome([ok], 20) == Outcome([Comment("c" * 19)], False, b"")
    too_long = b":" + b"c" * 20 + b"\n"
    for cut in range(len(too_long) + 1):
        assert outcome([too_long[:cut], too_long[cut:]], 20) == Outcome([], True, b""), cut


def test_unknown_fields_count_toward_the_limit() -> None:
    with pytest.raises(EventTooLarge):
        SSEDecoder(20).feed(b"foo: " + b"x" * 20 + b"\n\n")


def test_after_the_error_feed_raises_again() -> None:
    decoder = SSEDecoder(max_event_bytes=10)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"data: 0123456789\n\n")
    assert decoder.buffered_bytes == 0
    for chunk in [b"data: x\n\n", b": c\n", b"", b"\n"]:
        with pytest.raises(EventTooLarge) as info:
            decoder.feed(chunk)
        assert info.value.limit == 10
        assert info.value.completed == []


def test_default_limit_is_one_mebibyte() -> None:
    payload = "x" * ((1 << 20) - len(b"data: \n\n"))
    raw = encode_event(payload)
    assert len(raw) == 1 << 20
    assert SSEDecoder().feed(raw) == [Event(payload)]
    with pytest.raises(EventTooLarge) as info:
        SSEDecoder().feed(encode_event(payload + "x"))
    assert info.value.limit == 1 << 20


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------


def test_encode_event_field_order() -> None:
    raw = encode_event("x", event="delta", id=7, retry=100)
    assert raw == b"event: delta\nid: 7\nretry: 100\ndata: x\n\n"


def test_encode_event_data_only() -> None:
    assert encode_event("hello") == b"data: hello\n\n"
    assert encode_event("") == b"data: \n\n"
    assert encode_event(" lead") == b"data:  lead\n\n"


def test_encode_event_multi_line_data() -> None:
    assert encode_event("a\nb") == b"data: a\ndata: b\n\n"
    assert encode_event("a\r\nb\rc\n\nd") == b"data: a\ndata: b\ndata: c\ndata: \ndata: d\n\n"
    assert encode_event("\n") == b"data: \ndata: \n\n"
    assert encode_event("\r\n") == b"data: \ndata: \n\n"
    assert encode_event("\n\r") == b"data: \ndata: \ndata: \n\n"


def test_encode_event_without_data() -> None:
    assert encode_event(None) == b"\n"
    assert encode_event(None, event="e") == b"event: e\n\n"
    assert encode_event(None, id="abc", retry=0) == b"id: abc\nretry: 0\n\n"


def test_encode_event_utf8() -> None:
    assert encode_event("é😀", event="ñ") == "event: ñ\ndata: é😀\n\n".encode()


def test_encode_comment() -> None:
    # One line, no blank line: a blank line would dispatch an empty event in the SDKs' decoders.
    assert encode_comment("ping") == b":ping\n"
    assert encode_comment(" ping") == b": ping\n"
    assert encode_comment("") == b":\n"
    assert encode_comment("a\nb\r\nc\rd") == b":a b c d\n"
    assert encode_comment("é") == ":é\n".encode()


def test_round_trip() -> None:
    raw = (
        encode_comment(" hello")
        + encode_event("a\r\nb", event="message", id=1)
        + encode_event(None, retry=3000)
        + encode_comment("multi\nline")
        + encode_event("[DONE]")
    )
    assert decode_whole(raw) == [
        Comment(" hello"),
        Event("a\nb", event="message", id="1"),
        Event(None, retry=3000),
        Comment("multi line"),
        Event("[DONE]"),
    ]


def test_reencoding_a_decoded_stream_is_stable() -> None:
    items = decode_whole(UNICODE_BOM)
    parts: list[bytes] = []
    for item in items:
        if isinstance(item, Comment):
            parts.append(encode_comment(item.text))
        else:
            parts.append(encode_event(item.data, event=item.event, id=item.id, retry=item.retry))
    assert decode_whole(b"".join(parts)) == items
