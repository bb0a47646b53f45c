"""The shared live tail: one blocked ``XREAD`` serves every replay reader of this process.

Each reader catches up on its own with ``XRANGE`` pages, then subscribes here with its cursor
(the last seq it sent). The follower keeps one dedicated connection blocked in
``XREAD BLOCK ... STREAMS k1 k2 ... id1 id2 ...`` over every followed run, each from the lowest
cursor of its subscribers, and hands new entries to the subscribers that have not seen them.
Everything is cursor-based, so there is no subscribe-then-read race and no duplicate; nothing
polls: when a subscriber needs a key (or an older position) the blocked call does not cover, the
follower interrupts it with ``CLIENT UNBLOCK`` and blocks again with the new set.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.background import Background
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)

# A blocked read returns at least this often, so a silently dead connection is noticed.
BLOCK_MS = 5000
READ_COUNT = 1000


@dataclass(slots=True, frozen=True)
class Entry:
    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> Entry:
    raw_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    data = fields.get(b"data", b"")
    ts = fields.get(b"timestamp", b"0")
    return Entry(
        seq=int(raw_id.split("-", 1)[0]),
        data=data if isinstance(data, bytes) else str(data).encode(),
        timestamp_ms=int(ts),
        complete=fields.get(b"complete") == b"true",
    )


@dataclass(eq=False, slots=True)
class Subscription:
    """One reader's view of the live tail: a bounded buffer of entries after ``cursor``."""

    key: str
    cursor: int
    max_bytes: int
    entries: deque[Entry] = field(default_factory=deque)
    buffered: int = 0
    overflowed: bool = False
    gap: bool = False  # entries after the cursor were trimmed before they could be read
    closed: bool = (
        False  # the sidecar is shutting down: the reader should end (and resume elsewhere)
    )
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def broken(self) -> bool:
        """The reader cannot go on from here (too slow, or outrun by trimming)."""
        return self.overflowed or self.gap

    def offer(self, entry: Entry) -> None:
        if entry.seq <= self.cursor or self.broken:
            return
        if entry.seq != self.cursor + 1:
            # seqs are contiguous, so a jump means the length cap trimmed events this reader
            # never got: cut it, and its reconnect is told so (410) instead of a silent hole.
            self.gap = True
            self.entries.clear()
            self.ready.set()
            return
        self.cursor = entry.seq
        self.buffered += len(entry.data)
        if self.buffered > self.max_bytes:
            # The reader stopped reading: cut it loose instead of growing without bound.
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
    def __init__(self, redis_url: str, pool: Redis, metrics: Metrics, *, connect_timeout: float):
        # A dedicated single connection: it spends its life blocked, so it must not come from
        # the pool that serves everything else.
        self._blocker = Redis.from_url(
            redis_url,
            single_connection_client=True,
            socket_timeout=BLOCK_MS / 1000 + 5,
            socket_connect_timeout=connect_timeout,
        )
        self._pool = pool
        self._m = metrics
        self._subs: dict[str, set[Subscription]] = {}
        self._covered: dict[str, int] = {}  # what the blocked call in flight reads from
        self._changed = asyncio.Event()
        self._blocked_id: int | None = None
        self._blocking = False
        self._unblocking = False
        self._background = Background("sse-follower", self._loop)
        self._closing = False

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        await self._blocker.aclose()

    def subscribe(self, key: str, cursor: int, max_bytes: int) -> Subscription:
        sub = Subscription(key, cursor, max_bytes, closed=self._closing)
        self._subs.setdefault(key, set()).add(sub)
        covered = self._covered.get(key)
        if covered is None or cursor < covered:
            self._changed.set()
            self._interrupt()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    def close_subscriptions(self) -> None:
        """At shutdown: wake every reader so that it ends its response now."""
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.ready.set()

    def _interrupt(self) -> None:
        if self._blocking and not self._unblocking and self._blocked_id is not None:
            self._unblocking = True
            asyncio.get_running_loop().create_task(self._unblock(self._blocked_id))

    async def _unblock(self, client_id: int) -> None:
        try:
            # The XREAD may be on its way but not yet blocked in Redis, where UNBLOCK finds
            # nothing to do: try again until it took effect or the read returned by itself.
            while self._blocking and not await self._pool.client_unblock(client_id):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("cannot interrupt the blocked live-tail read: %s", exc)
        finally:
            self._unblocking = False

    async def _loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._blocked_id is None:
                    self._blocked_id = int(await self._blocker.client_id())
                await self._read_once()
                backoff = 0.05
            except (redis_errors.RedisError, OSError) as exc:
                self._blocked_id = None
                self._m.redis_errors.labels("follow").inc()
                log.warning("live-tail read failed, retrying: %s", exc)
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, 2.0)

    async def _read_once(self) -> None:
        positions = {key: min(s.cursor for s in subs) for key, subs in self._subs.items()}
        self._covered = positions
        self._changed.clear()
        self._blocking = True
        try:
            reply: Any = await self._blocker.xread(
                {key: f"{seq}-0" for key, seq in positions.items()},
                count=READ_COUNT,
                block=BLOCK_MS,
            )
        finally:
            self._blocking = False
            self._covered = {}
        for raw_key, entries in reply or ():
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            subs = self._subs.get(key)
            if not subs:
                continue
            parsed = [parse_entry(entry_id, fields) for entry_id, fields in entries]
            read_from = positions.get(key, 0)
            for sub in list(subs):
                # A reader that subscribed while this read was in flight, from an older cursor,
                # is not covered by it (the next read is): offering it these would look like a gap.
                if sub.cursor < read_from:
                    continue
                for entry in parsed:
                    sub.offer(entry)
