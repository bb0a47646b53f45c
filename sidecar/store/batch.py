"""Reads that many callers need at the same moment, sent together: every read queued while the
round trips already under way were busy goes in the next one, pipelined.

A burst of replay starts (a reader on every run of a busy process, or every client resuming
after a deploy) needs the run's meta and a page of events per reader. Sent one command per
pooled connection, those reads queue for the pool's few connections, and on a loaded event loop
each command holds its connection for a whole loop cycle: the measured result was 594-828 of
1,000 replay starts refused with 503 (no connection within the timeout) while the writer, on the
same pool, fell behind. Coalesced, a burst costs a handful of round trips; at light load a read
still goes out at once on a round trip of its own, so nothing waits that did not wait before.

The round trip (a pooled connection, the timeout, the error translation) is the store's; this
module only decides what goes together. Hand-written because redis-py has no such coalescing: its
pipeline sends what one caller put in it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

RoundTrip = Callable[[bytes, int], Awaitable[list[Any]]]


class ReadBatcher:
    """Coalesces packed read commands into pipelined round trips, at most ``max_inflight`` at
    once (the rest of the pool stays free for the writer and the other callers), each carrying
    at most ``max_batch`` commands (one round trip's replies are parsed in one go on the loop:
    bounded, so a burst of large pages does not stall it)."""

    def __init__(self, round_trip: RoundTrip, *, max_inflight: int, max_batch: int = 64) -> None:
        self._round_trip = round_trip
        self._max_inflight = max(1, max_inflight)
        self._max_batch = max_batch
        self._queue: deque[tuple[bytes, asyncio.Future[Any]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def call(self, command: bytes) -> Any:
        """The reply to one packed command (an error reply is returned, not raised); raises
        what the round trip raised (the store's own errors)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.cancel()
        self._queue.append((command, future))
        if self._inflight < self._max_inflight:
            self._launch()
        # A caller cancelled here (its client went away) leaves the round trip alone: the other
        # callers in it still get their replies; a queued command of a cancelled caller is
        # skipped when its batch is formed.
        return await future

    async def aclose(self) -> None:
        """Cancel the reads queued and under way (their callers get ``CancelledError``)."""
        self._closed = True
        while self._queue:
            _, future = self._queue.popleft()
            future.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _launch(self) -> None:
        batch: list[tuple[bytes, asyncio.Future[Any]]] = []
        while self._queue and len(batch) < self._max_batch:
            command, future = self._queue.popleft()
            if not future.done():
                batch.append((command, future))
        if not batch:
            return
        self._inflight += 1
        task = asyncio.create_task(self._send(batch), name="sse-store-reads")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip(b"".join(c for c, _ in batch), len(batch))
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the store's error, or a bug: every caller in it gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        finally:
            self._inflight -= 1
            if self._queue and not self._closed:
                self._launch()
