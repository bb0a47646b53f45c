"""Stream replies parsed into entries (``sidecar.store.entries``): the scripts' layout by
position, any other layout by name, RESP2 and RESP3 alike (bytes in, bytes out)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.store.entries import Entry, parse_entries


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
