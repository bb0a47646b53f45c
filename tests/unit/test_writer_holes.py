"""Which gaps a writer batch may carry (sidecar/writer.py ``own_holes_only``): the holes the
writer made itself (overflow), however many, and nothing else; events at or below the last seq
Redis confirmed (sent again after a lost reply, skipped by the script) are no gap at all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.store import Pending
from sidecar.writer import own_holes_only


def events(*seqs: int) -> list[Pending]:
    return [Pending(seq, b"", 0, False) for seq in seqs]


@pytest.mark.parametrize(
    ("written", "seqs", "resumed", "allowed"),
    [
        (0, (1, 2, 3), set(), False),  # no gap
        (3, (4, 5), set(), False),
        (3, (), set(), False),
        (3, (4, 7, 8), {7}, True),  # one hole the writer made
        (3, (4, 7, 8, 12), {7, 12}, True),  # several, the newest not yet reached too
        (3, (4, 7, 8), {12}, False),  # a hole the writer did not make
        (3, (4, 7, 8, 12), {12}, False),  # one of its own and one that is not
        (0, (5, 6), {5}, True),  # dropped from the first event on
        (0, (5, 6), set(), False),
        # A reply was lost: Redis confirmed 1-3 later (written 3) while they are still queued.
        (3, (1, 2, 3, 4, 9), {9}, True),
        (3, (1, 2, 3), set(), False),
        (3, (2, 3, 9), {9}, True),
        (3, (1, 2, 3, 9), set(), False),
    ],
)
def test_own_holes_only(
    written: int, seqs: tuple[int, ...], resumed: set[int], allowed: bool
) -> None:
    assert own_holes_only(written, events(*seqs), resumed) is allowed


@given(
    written=st.integers(0, 50),
    resent=st.integers(0, 10),
    kept=st.lists(st.booleans(), min_size=1, max_size=80),
)
def test_whatever_overflow_dropped_a_batch_may_carry(
    written: int, resent: int, kept: list[bool]
) -> None:
    """A run's queue as the writer builds it: maybe some seqs Redis already holds, then the
    seqs after ``written`` of which overflow dropped some (``kept`` False), each hole ending at a
    seq the writer resumed at. Every prefix of that queue (a batch) is allowed exactly when it
    crosses a hole."""
    queue = list(range(max(1, written - resent + 1), written + 1))
    resumed: set[int] = set()
    dropping = False
    for offset, keep in enumerate(kept, 1):
        seq = written + offset
        if keep:
            if dropping:
                resumed.add(seq)
            queue.append(seq)
        dropping = not keep
    for n in range(len(queue) + 1):
        batch = queue[:n]
        crosses = any(seq in resumed for seq in batch)
        assert own_holes_only(written, events(*batch), resumed) is crosses
