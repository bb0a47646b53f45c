"""The shared live tail: one source of new entries serves every replay reader of this process.

Each reader catches up on its own from history, then subscribes here with its cursor (the last
seq it sent). The follower has the store's ``LiveTail`` follow every run that has subscribers,
each from the lowest position among them, and hands what the tail delivers to the subscribers
that have not seen it. Everything is cursor-based, so there is no subscribe-then-read race and no
duplicate; nothing polls. Whatever the topology (one blocked ``XREAD`` on one Redis or Sentinel,
sharded pub/sub wake-ups on a cluster: ``sidecar/store/tail.py``), a delivery is contiguous from
the tail's cursor for the run, and a subscriber whose position that cursor does not cover (it
joined while the read was in flight) is skipped: the tail reads the run again from there.

When Redis comes back after the tail lost it, or the probe finds that Redis lost its data,
the follower asks the store which followed runs still exist; the readers of a run that vanished
are told (``Subscription.lost``) instead of waiting forever for entries that will never come.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.background import Background
from sidecar.client_out import http_chunk
from sidecar.errors import StoreError
from sidecar.keys import RunId
from sidecar.store import Entry, RunStore, backoff
from sidecar.store.tail import StoredEvent
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Sink:
    """A live reader's connection, written by the follower itself as entries arrive.

    With 1,000 readers on a run, waking each reader's task to write what the tail delivered
    cost a task switch, two timers and a write per reader per event (lag p99 ~330 ms on one
    core). The follower instead frames the delivery once (HTTP chunked encoding, as aiohttp
    would) and hands those bytes to every reader's transport in one pass; the reader's task
    sleeps until something needs it (the end, a cut, a heartbeat). Only while the reader keeps
    up: once bytes wait in the process for the kernel, entries queue for the reader's task as
    before (bounded by ``max_bytes``, written under the write timeout).
    """

    transport: asyncio.WriteTransport
    linked: dict[str, str] | None = None  # the reader's trace, for the lag's exemplars
    events: int = 0  # entries written by the follower
    cursor: int = 0  # the last seq the follower wrote
    last_write: float = 0.0  # loop time of the follower's last write


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
    sink: Sink | None = None  # written by the follower (Sink), else by the reader's task

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
    """The subscriptions of this process's replay readers, fed by the store's live tail (the
    follower is the tail's ``TailListener``)."""

    def __init__(self, store: RunStore, metrics: Metrics) -> None:
        self._store = store
        self._m = metrics
        self._subs: dict[RunId, set[Subscription]] = {}
        self._tail = store.live_tail(self)
        self._resync = asyncio.Event()
        self._background = Background("sse-follower", self._loop, metrics)
        self._closing = False
        self._backoff = backoff(0.05, 2.0)

    def start(self) -> None:
        self._tail.start()
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        await self._tail.close()

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
        self._tail.follow(run_id, sub.position)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.run_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.run_id]
                self._tail.unfollow(sub.run_id)

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

    # -- the writer's reports (writer.StoredFeed): passed to the tail -----------------------

    def stored(self, run_id: RunId, events: Sequence[StoredEvent]) -> None:
        self._tail.stored(run_id, events)

    def abandoned(self, run_id: RunId) -> None:
        self._tail.abandoned(run_id)

    # -- the tail's reports (TailListener) ---------------------------------------------------

    def deliver(self, run_id: RunId, after: int, entries: list[Entry]) -> None:
        first, last = entries[0].seq, entries[-1]
        # Written straight to the readers' connections (Sink) when the delivery is whole: each
        # different tail of it framed once, whatever the number of readers at that cursor.
        whole = last.seq - first == len(entries) - 1
        frames: dict[int, bytes] = {}
        now = asyncio.get_running_loop().time()
        began = time.time()
        readers: dict[int, int] = {}  # offset into entries -> readers written from there
        linked: dict[str, str] | None = None  # one reader's trace, for the lag's exemplars
        for sub in list(self._subs.get(run_id, ())):
            # A reader whose position this read did not cover (it joined with an older cursor
            # while the read was in flight) is not offered it: that would look like a gap. The
            # tail reads the run again from its position.
            if sub.position < after:
                continue
            sink = sub.sink
            start = sub.cursor + 1 - first
            if (
                sink is None
                or not whole
                or not 0 <= start < len(entries)
                or sub.entries
                or sub.broken
                or sub.ended
                or sub.closed
                or sink.transport.is_closing()
                # Bytes still wait in the process for the kernel: the reader is behind. Its
                # task writes from now on, waiting for the client under the write timeout and
                # bounded by max_bytes, and a cut leaves the client at an event boundary.
                or sink.transport.get_write_buffer_size()
            ):
                for entry in entries:
                    sub.offer(entry)
                continue
            frame = frames.get(start)
            if frame is None:
                # Empty for an end entry without bytes (generic): nothing is written.
                frame = frames[start] = http_chunk(b"".join(e.data for e in entries[start:]))
            if frame:
                sink.transport.write(frame)
            sink.events += len(entries) - start
            sink.cursor = last.seq
            sink.last_write = now
            readers[start] = readers.get(start, 0) + 1
            linked = sink.linked or linked
            sub.cursor = sub.position = last.seq
            if last.complete:
                sub.ended = True
                sub.ready.set()
        if readers:
            # Every reader written from the same offset got the same entries: counted once per
            # entry, not once per reader, at the middle of the pass (1,000 readers take ~15 ms
            # of socket writes: the mean lag is right, each reader's within half of that).
            now_s = (began + time.time()) / 2
            observe = self._m.replay_delivery_lag.observe_times
            written = 0
            for start, count in readers.items():
                written += count * (len(entries) - start)
                for e in entries[start:]:
                    observe(max(0.0, now_s - e.timestamp_ms / 1000), count, linked)
            self._m.replay_events.inc(written)

    def failed(self, error: StoreError) -> None:
        self._m.redis_errors.labels("follow").inc()
        log.warning("live-tail read failed, retrying: %s", error)

    def recovered(self) -> None:
        # Back after an outage: Redis may have come back empty.
        self._resync.set()

    async def _loop(self) -> None:
        failures = 0
        while True:
            await self._resync.wait()
            self._resync.clear()
            try:
                await self.check_runs()
                failures = 0
            except StoreError as exc:
                failures += 1
                self._m.redis_errors.labels("follow").inc()
                log.warning("cannot check the followed runs, retrying: %s", exc)
                self._resync.set()
                await asyncio.sleep(self._backoff(failures))
