"""The store's read coalescing (sidecar/store/batch.py), driven by a round trip the test holds
open: what goes out together, in which order replies come back, and what a failure or a
cancelled caller does to the others. (The real round trip on a real Redis is in
tests/functional/test_store_reads.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.errors import StoreUnavailable
from sidecar.store.batch import ReadBatcher


class HeldRoundTrips:
    """Round trips that answer each command with its own text once released, in the order
    they were sent."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self._gates: list[asyncio.Future[BaseException | None]] = []
        self.started = asyncio.Event()

    async def __call__(self, payload: bytes, replies: int) -> list[Any]:
        commands = payload.split(b";")[:-1]
        assert len(commands) == replies
        self.sent.append(commands)
        gate: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._gates.append(gate)
        self.started.set()
        error = await gate
        if error is not None:
            raise error
        return [b"reply to " + c for c in commands]

    def release(self, index: int, error: BaseException | None = None) -> None:
        self._gates[index].set_result(error)


def cmd(n: int) -> bytes:
    return b"c%d;" % n


async def settle() -> None:
    """Let every ready task run (the batcher launches round trips as tasks)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_read_goes_out_at_once_in_a_round_trip_of_its_own() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=2)
    call = asyncio.create_task(batcher.call(cmd(1)))
    await settle()
    assert trips.sent == [[b"c1"]]
    trips.release(0)
    assert await call == b"reply to c1"


async def test_reads_queued_behind_busy_round_trips_go_together_each_to_its_caller() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=2)
    first = [asyncio.create_task(batcher.call(cmd(n))) for n in (1, 2)]
    await settle()
    assert trips.sent == [[b"c1"], [b"c2"]]  # two round trips under way: the bound
    queued = [asyncio.create_task(batcher.call(cmd(n))) for n in range(3, 9)]
    await settle()
    assert len(trips.sent) == 2  # nothing more goes out while both are busy
    trips.release(1)
    await settle()
    # Everything queued meanwhile, in one round trip, in order.
    assert trips.sent[2] == [b"c%d" % n for n in range(3, 9)]
    trips.release(2)
    assert await asyncio.gather(*queued) == [b"reply to c%d" % n for n in range(3, 9)]
    trips.release(0)
    assert await asyncio.gather(*first) == [b"reply to c1", b"reply to c2"]


async def test_a_round_trip_carries_at_most_max_batch_commands() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=1, max_batch=4)
    calls = [asyncio.create_task(batcher.call(cmd(n))) for n in range(10)]
    await settle()
    for i in range(4):
        trips.release(i)
        await settle()
    assert [len(s) for s in trips.sent] == [1, 4, 4, 1]
    assert await asyncio.gather(*calls) == [b"reply to c%d" % n for n in range(10)]


async def test_a_failed_round_trip_fails_its_callers_only_and_the_next_one_goes_out() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=1)
    first = asyncio.create_task(batcher.call(cmd(1)))
    await settle()
    behind = [asyncio.create_task(batcher.call(cmd(n))) for n in (2, 3)]
    await settle()
    error = StoreUnavailable("read", "ConnectionError: gone")
    trips.release(0, error)
    with pytest.raises(StoreUnavailable) as raised:
        await first
    assert raised.value is error
    await settle()
    assert trips.sent[1] == [b"c2", b"c3"]
    trips.release(1)
    assert await asyncio.gather(*behind) == [b"reply to c2", b"reply to c3"]


async def test_a_cancelled_caller_is_not_sent_and_does_not_disturb_the_others() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=1)
    first = asyncio.create_task(batcher.call(cmd(1)))
    await settle()
    gone = asyncio.create_task(batcher.call(cmd(2)))
    kept = asyncio.create_task(batcher.call(cmd(3)))
    await settle()
    gone.cancel()
    first.cancel()  # mid round trip: the round trip goes on for the others in it
    await settle()
    trips.release(0)
    await settle()
    assert trips.sent[1] == [b"c3"]
    trips.release(1)
    assert await kept == b"reply to c3"
    assert gone.cancelled()
    assert first.cancelled()


async def test_closing_cancels_queued_and_running_reads() -> None:
    trips = HeldRoundTrips()
    batcher = ReadBatcher(trips, max_inflight=1)
    running = asyncio.create_task(batcher.call(cmd(1)))
    await settle()
    queued = asyncio.create_task(batcher.call(cmd(2)))
    await settle()
    await batcher.aclose()
    await settle()
    assert running.cancelled()
    assert queued.cancelled()
    assert len(trips.sent) == 1
    with pytest.raises(asyncio.CancelledError):
        await batcher.call(cmd(3))
