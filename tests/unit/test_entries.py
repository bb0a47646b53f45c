"""Stream replies parsed into entries (``sidecar.store.entries``): the scripts' layout by
position, any other layout by name, RESP2 and RESP3 alike (bytes in, bytes out)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.store.entries import Entry, Page, contiguous, parse_entries, parse_page


def scripts_layout(seq: int, data: bytes, ts: int, complete: bool) -> list[bytes]:
    """What append.lua and finalize.lua XADD, as XRANGE returns it."""
    flag = b"true" if complete else b"false"
    return [b"seq_id", b"%d" % seq, b"data", data, b"timestamp", b"%d" % ts, b"complete", flag]


@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**12), st.binary(max_size=64), st.integers(0, 2**45), st.booleans()
        ),
        max_size=20,
    )
)
def test_the_scripts_layout_is_read_by_position(rows: list[tuple[int, bytes, int, bool]]) -> None:
    page = [[b"%d-0" % seq, scripts_layout(seq, data, ts, c)] for seq, data, ts, c in rows]
    assert parse_entries(page) == [Entry(seq, data, ts, c) for seq, data, ts, c in rows]


def test_another_layout_is_read_by_name() -> None:
    page = [
        [b"7-0", [b"complete", b"true", b"data", b"x", b"timestamp", b"12"]],
        [b"8-0", [b"data", b"y"]],
        # data named "data" that looks like the scripts' layout at the wrong places
        [b"9-0", [b"data", b"seq_id", b"timestamp", b"3", b"complete", b"false", b"x", b"y"]],
    ]
    assert parse_entries(page) == [
        Entry(7, b"x", 12, True),
        Entry(8, b"y", 0, False),
        Entry(9, b"seq_id", 3, False),
    ]


def raw_page(rows: list[tuple[int, bytes, int, bool]]) -> list[list[Any]]:
    return [[b"%d-0" % seq, scripts_layout(seq, data, ts, c)] for seq, data, ts, c in rows]


@given(
    st.integers(0, 10**6),
    st.lists(st.tuples(st.integers(1, 3), st.binary(max_size=16), st.booleans()), max_size=30),
    st.booleans(),
)
def test_a_page_is_the_whole_run_after_the_cursor_up_to_its_first_hole(
    cursor: int, steps: list[tuple[int, bytes, bool]], other_layout: bool
) -> None:
    """``parse_page`` against ``parse_entries`` + ``contiguous``: seqs rising by 1 to 3 (a step
    over 1 is a hole), the scripts' layout or one entry in another."""
    rows, seq = [], cursor
    for step, data, complete in steps:
        seq += step
        rows.append((seq, data, seq * 7, complete))
    page = raw_page(rows)
    if other_layout and page:
        page[len(page) // 2][1] = [b"data", rows[len(page) // 2][1]]
    entries = parse_entries(page)
    whole = contiguous(entries, cursor)
    got = parse_page(page, cursor)
    assert got == Page(
        b"".join(e.data for e in whole),
        len(whole),
        whole[-1].seq if whole else cursor,
        bool(whole) and whole[-1].complete,
        len(page),
        max((e.seq for e in entries), default=0),
    )


def test_a_page_of_the_scripts_layout_without_holes_is_joined_whole() -> None:
    page = raw_page([(5, b"a", 1, False), (6, b"bc", 2, False), (7, b"", 3, True)])
    assert parse_page(page, 4) == Page(b"abc", 3, 7, True, 3, 7)
    # The cursor one before the page's first seq: a hole before it, nothing is sent.
    assert parse_page(page, 3) == Page(b"", 0, 3, False, 3, 7)
    assert parse_page([], 9) == Page(b"", 0, 9, False, 0, 0)
