"""The shared live tail: one blocked read serves every replay reader of this process.

Each reader catches up on its own from history, then subscribes here with its cursor (the last
seq it sent). The follower keeps the store's ``Tail`` blocked on every followed run, each from
the lowest cursor of its subscribers, and hands new entries to the subscribers that have not seen
them. Everything is cursor-based, so there is no subscribe-then-read race and no duplicate;
nothing polls: when a subscriber needs a run (or an older position) the blocked read does not
cover, the follower interrupts it and blocks again with the new set.

When Redis comes back after the follower lost it, or the probe finds that Redis lost its data,
the follower asks the store which followed runs still exist; the readers of a run that vanished
are told (``Subscription.lost``) instead of waiting forever for entries that will never come.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from sidecar.background import Background
from sidecar.errors import StoreError
from sidecar.keys import RunId
from sidecar.store import Entry, RunStore, backoff
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)

READ_COUNT = 1000


@dataclass(eq=False, slots=True)
class Subscription:
    """One reader's view of the live tail: a bounded buffer of entries after ``cursor``."""

    run_id: RunId
    cursor: int  # the last seq the reader has (nothing at or before it is offered)
    max_bytes: int
    # Where the live tail reads from for this reader: its cursor, or the run's stored end when
    # the reader is ahead of it (it got events live before the writer stored them), so that
    # the run's last entry is seen even when it is at or before the cursor.
    position: int = -1
    entries: deque[Entry] = field(default_factory=deque)
    buffered: int = 0
    overflowed: bool = False  # the reader stopped reading: cut it loose
    gap: bool = False  # the next entry is not cursor + 1 (trimmed, lost, or Redis lost data)
    lost: bool = False  # the run vanished from Redis (its history is gone)
    # The run's last entry is at or before the cursor (the reader had it live before the writer
    # stored it): nothing more will ever come.
    ended: bool = False
    closed: bool = False  # the sidecar is shutting down: the reader should end (and resume)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def broken(self) -> bool:
        """The reader cannot go on from here."""
        return self.overflowed or self.gap or self.lost

    def __post_init__(self) -> None:
        if self.position < 0 or self.position > self.cursor:
            self.position = self.cursor

    def offer(self, entry: Entry) -> None:
        if self.broken:
            return
        if entry.seq <= self.cursor:
            self.position = max(self.position, entry.seq)
            if entry.complete:
                self.ended = True
                self.ready.set()
            return
        if entry.seq != self.cursor + 1:
            # seqs are contiguous, so a jump means events this reader never got are not there
            # (trimmed by the length cap, lost by the writer, or lost by Redis): the reader
            # finds out which and says so, instead of streaming over a silent hole.
            self.gap = True
            self.ready.set()
            return
        self.cursor = self.position = entry.seq
        self.buffered += len(entry.data)
        if self.buffered > self.max_bytes:
            self.overflowed = True
            self.entries.clear()
        else:
            self.entries.append(entry)
        self.ready.set()

    def take(self) -> list[Entry]:
        out = list(self.entries)
        self.entries.clear()
        self.buffered = 0
        self.ready.clear()
        return out


class Follower:
    def __init__(self, store: RunStore, metrics: Metrics) -> None:
        self._store = store
        self._tail = store.tail()
        self._m = metrics
        self._subs: dict[RunId, set[Subscription]] = {}
        self._covered: dict[RunId, int] = {}  # what the blocked read in flight reads from
        self._changed = asyncio.Event()
        self._background = Background("sse-follower", self._loop, metrics)
        self._closing = False
        self._backoff = backoff(0.05, 2.0)

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        await self._tail.aclose()

    @property
    def followed(self) -> int:
        return len(self._subs)

    def subscribe(
        self, run_id: RunId, cursor: int, max_bytes: int, *, stored: int | None = None
    ) -> Subscription:
        """Follow ``run_id`` after ``cursor``; ``stored``: the run's last stored seq, if known."""
        position = cursor if stored is None else min(cursor, stored)
        sub = Subscription(run_id, cursor, max_bytes, position, closed=self._closing)
        self._subs.setdefault(run_id, set()).add(sub)
        covered = self._covered.get(run_id)
        if covered is None or sub.position < covered:
            self._changed.set()
            self._tail.interrupt()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.run_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.run_id]

    def close_subscriptions(self) -> None:
        """At shutdown: wake every reader so that it ends its response now."""
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.ready.set()

    async def check_runs(self) -> None:
        """Tell the readers of runs that Redis no longer holds (it lost its data)."""
        followed = list(self._subs)
        existing = await self._store.existing(followed)
        for run_id in followed:
            if run_id in existing:
                continue
            log.warning(
                "a followed run vanished from Redis: its readers are told",
                extra={"run_id": run_id, "reason": "history_lost"},
            )
            for sub in self._subs.get(run_id, ()):
                sub.lost = True
                sub.ready.set()

    async def _loop(self) -> None:
        failures = 0
        while True:
            if not self._subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if failures:
                    # Back after an outage: Redis may have come back empty.
                    await self.check_runs()
                await self._read_once()
                failures = 0
            except StoreError as exc:
                failures += 1
                self._m.redis_errors.labels("follow").inc()
                log.warning("live-tail read failed, retrying: %s", exc)
                await asyncio.sleep(self._backoff(failures))

    async def _read_once(self) -> None:
        positions = {run_id: min(s.position for s in subs) for run_id, subs in self._subs.items()}
        self._covered = positions
        self._changed.clear()
        try:
            found = await self._tail.read(positions, READ_COUNT)
        finally:
            self._covered = {}
        for run_id, entries in found.items():
            subs = self._subs.get(run_id)
            if not subs:
                continue
            read_from = positions.get(run_id, 0)
            for sub in list(subs):
                # A reader that subscribed while this read was in flight, from an older cursor,
                # is not covered by it (the next read is): offering it these would look like a gap.
                if sub.position < read_from:
                    continue
                for entry in entries:
                    sub.offer(entry)
