"""The live tail, one interface whatever the topology: a push-style source of new entries.

``follow(run_id, cursor)`` asks for the entries of a run after ``cursor``, now and as they come
(a lower cursor than the one the tail holds for the run lowers it: the run is read again from
there); ``unfollow(run_id)`` stops that. The tail hands what it reads to its ``TailListener``:
``deliver(run_id, after, entries)`` with entries contiguous from ``after``, the tail's cursor
for the run when that read was sent. A read whose cursor was lowered meanwhile is dropped and
made again, so a follower that joins with an older cursor is never offered a delivery that does
not cover it.

Two sources implement it (``RunStore.live_tail`` picks one by topology, README "The live tail"):

- ``BlockingTail`` (one Redis, Sentinel): one dedicated connection blocked in
  ``XREAD BLOCK ... STREAMS k1 k2 ...`` over every followed run, each from its cursor; when a run
  (or an older cursor) must be added, ``CLIENT UNBLOCK`` ends the blocked read early. The XADD
  of the append script wakes it: nothing more per write.
- ``ClusterTail`` (``cluster_tail.py``; Redis Cluster, where one command may only name keys of
  one slot): sharded pub/sub wake-ups, then pipelined cursor reads.

The runs this process tees need no read at all: the writer reports what Redis confirmed it
stored (``stored``), and ``BlockingTail`` delivers that straight from the writer's buffer, in
the round trip's reply, while it follows on from the run's cursor. A run it cannot serve that
way (a reader behind what is stored, a seq the writer skipped, a run the writer gave up) is
read from Redis as any other. At 1,000 teed runs with a reader each, reading back what the
process had just written was 5-6 MB/s of ``XREAD`` replies, parsed entry by entry, and its
readers lagged 7 s at p99 (``make bench``, readers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.background import Background
from sidecar.errors import StoreError
from sidecar.keys import RunId
from sidecar.store.connect import abort
from sidecar.store.entries import Entry, parse_entries, raw_reply, text
from sidecar.store.errors import FOREIGN

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from sidecar.store.runstore import RunStore

log = logging.getLogger(__name__)

READ_COUNT = 1000  # entries per run and read; a full page is read again at once
# Stored events held for a run whose cursor is behind them, at most (past it: read from Redis).
MAX_HELD = 1000
BACKOFF_START = 0.05
BACKOFF_MAX = 2.0


class TailListener(Protocol):
    """What a live tail reports to (the follower)."""

    def deliver(self, run_id: RunId, after: int, entries: list[Entry]) -> None:
        """New entries of a followed run: contiguous, the first one right after ``after``."""
        ...

    def failed(self, error: StoreError) -> None:
        """A read or a subscription failed; the tail retries on its own."""
        ...

    def recovered(self) -> None:
        """Redis answers again after failures: followed runs may have vanished meanwhile."""
        ...


class StoredEvent(Protocol):
    """An event as the writer confirms it stored (``store.Pending``): what an ``Entry`` holds."""

    @property
    def seq(self) -> int: ...

    @property
    def data(self) -> bytes: ...

    @property
    def timestamp_ms(self) -> int: ...

    @property
    def complete(self) -> bool: ...


class LiveTail(Protocol):
    def start(self) -> None: ...

    async def close(self) -> None: ...

    def follow(self, run_id: RunId, cursor: int) -> None: ...

    def unfollow(self, run_id: RunId) -> None: ...

    def stored(self, run_id: RunId, events: Sequence[StoredEvent]) -> None:
        """This process's writer stored ``events`` of ``run_id`` (in seq order; Redis
        confirmed them)."""
        ...

    def abandoned(self, run_id: RunId) -> None:
        """This process's writer will store nothing more of ``run_id`` (it gave the run up)."""
        ...


def retry_delay(failures: int) -> float:
    return float(min(BACKOFF_START * 2 ** max(failures - 1, 0), BACKOFF_MAX))


class BlockingTail:
    """The live tail on one Redis (or the primary Sentinel names): one blocked ``XREAD``."""

    # A blocked read returns at least this often, so a silently dead connection is noticed.
    BLOCK_MS = 5000

    def __init__(self, store: RunStore, listener: TailListener) -> None:
        self._store = store
        self._keys = store.keys
        self._listener = listener
        # Not retried by redis-py: this loop retries on its own, and a read that fails at once
        # is how ``close`` (and a Sentinel failover) ends a blocked read.
        self._client: Redis = store.dedicated(socket_timeout=self.BLOCK_MS / 1000 + 5, retry=False)
        self._client.set_response_callback("XREAD", raw_reply)  # parsed by parse_entries
        self._cursors: dict[RunId, int] = {}
        # The runs this process's writer stores, and the last seq it stored of each: a followed
        # one whose cursor is there gets its entries from the writer (``stored``), not a read.
        self._local: dict[RunId, int] = {}
        # What the writer stored past a followed run's cursor while the cursor was behind it
        # (a reader that joined with an older cursor): kept until the read that fills the gap
        # has come, then delivered from here. Without it a busy process never caught up: its
        # read took longer than the writer's next round trip, every time.
        self._held: dict[RunId, list[StoredEvent]] = {}
        self._reading: Mapping[RunId, int] = {}  # what the read in flight covers
        self._changed = asyncio.Event()
        self._client_id: int | None = None
        self._blocking = False
        self._unblocking: asyncio.Task[None] | None = None
        self._background = Background("sse-live-tail", self._loop, store.metrics)
        self._closed = False  # a read that swallowed its cancellation must not go on

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        self._closed = True
        abort(self._client)
        await self._background.stop()
        await self._client.aclose()

    def follow(self, run_id: RunId, cursor: int) -> None:
        held = self._cursors.get(run_id)
        if held is not None and held <= cursor:
            return
        self._cursors[run_id] = cursor
        if cursor >= self._local.get(run_id, cursor + 1):
            return  # the writer's reports carry it on from there
        self._changed.set()
        covered = self._reading.get(run_id)
        if covered is None or cursor < covered:
            self._interrupt()

    def unfollow(self, run_id: RunId) -> None:
        # The read in flight may still name it: its entries are dropped when it returns.
        self._cursors.pop(run_id, None)
        self._held.pop(run_id, None)

    def stored(self, run_id: RunId, events: Sequence[StoredEvent]) -> None:
        last = events[-1]
        if last.complete:
            # Its end: nothing more will be stored (a reader that comes later reads Redis).
            self._local.pop(run_id, None)
        else:
            self._local[run_id] = last.seq
        if run_id not in self._cursors:
            return
        held = self._held.get(run_id)
        if held is not None:
            if len(held) + len(events) > MAX_HELD:
                del self._held[run_id]  # the read catches up on all of it
            else:
                held.extend(events)
            return
        self._held[run_id] = list(events)
        self._pass_held(run_id)

    def _pass_held(self, run_id: RunId) -> None:
        """Deliver what is held for the run from its cursor on, if it follows on from it."""
        held = self._held.pop(run_id, None)
        cursor = self._cursors.get(run_id)
        if held is None or cursor is None or held[-1].seq <= cursor:
            return
        start = 0
        while held[start].seq <= cursor:  # read already, or stored again after a lost reply
            start += 1
        if held[start].seq != cursor + 1:
            # Behind what the writer stores now (a reader that joined with an older cursor), or
            # across a seq the writer skipped: Redis has the run in full, read it there; this
            # waits for that read.
            self._held[run_id] = held[start:]
            self._read_again(run_id)
            return
        entries = [Entry(e.seq, e.data, e.timestamp_ms, e.complete) for e in held[start:]]
        self._cursors[run_id] = entries[-1].seq
        self._listener.deliver(run_id, cursor, entries)

    def abandoned(self, run_id: RunId) -> None:
        self._held.pop(run_id, None)
        if self._local.pop(run_id, None) is not None and run_id in self._cursors:
            self._read_again(run_id)

    def _read_again(self, run_id: RunId) -> None:
        """A followed run the writer's reports do not cover: into the blocked read."""
        self._changed.set()
        if run_id not in self._reading:
            self._interrupt()

    def _positions(self) -> dict[RunId, int]:
        """What the next read covers: every followed run but those the writer keeps current."""
        local = self._local
        if not local:
            return dict(self._cursors)
        return {
            run_id: cursor
            for run_id, cursor in self._cursors.items()
            if cursor < local.get(run_id, cursor + 1)
        }

    async def _loop(self) -> None:
        failures = 0
        while not self._closed:
            positions = self._positions()
            if not positions:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._reading = positions
            self._changed.clear()
            try:
                if self._client_id is None:
                    self._client_id = int(await self._client.client_id())
                    if failures:
                        failures = 0
                        self._listener.recovered()
                found = await self._read(positions)
            except FOREIGN as exc:
                if self._closed:
                    return
                self._client_id = None
                failures += 1
                self._listener.failed(self._store.failed("follow", exc))
                await asyncio.sleep(retry_delay(failures))
                continue
            finally:
                self._reading = {}
            self._store.health.ok()
            for run_id, entries in found.items():
                after = positions[run_id]
                # Unfollowed, or followed again from an older cursor (read again from there).
                if self._cursors.get(run_id) != after or not entries:
                    continue
                self._cursors[run_id] = entries[-1].seq
                self._listener.deliver(run_id, after, entries)
                if run_id in self._held:
                    self._pass_held(run_id)

    async def _read(self, positions: Mapping[RunId, int]) -> dict[RunId, list[Entry]]:
        keys = self._keys
        self._blocking = True
        try:
            reply: Any = await self._client.xread(
                {keys.stream(run_id): f"{seq}-0" for run_id, seq in positions.items()},
                count=READ_COUNT,
                block=self.BLOCK_MS,
            )
        finally:
            self._blocking = False
        out: dict[RunId, list[Entry]] = {}
        # RESP2 answers a list of [key, entries] pairs, RESP3 a map of key to entries.
        streams = reply.items() if isinstance(reply, dict) else reply or ()
        for raw_key, entries in streams:
            run_id = keys.run_id_of(text(raw_key))
            out[run_id] = parse_entries(entries)
        return out

    def _interrupt(self) -> None:
        if self._blocking and self._unblocking is None and self._client_id is not None:
            # Kept referenced until done: the loop holds tasks only weakly.
            self._unblocking = asyncio.get_running_loop().create_task(
                self._unblock(self._client_id)
            )

    async def _unblock(self, client_id: int) -> None:
        try:
            # The XREAD may be on its way but not yet blocked in Redis, where UNBLOCK finds
            # nothing to do: try again until it took effect or the read returned by itself.
            while self._blocking and not await self._store.unblock(client_id):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        except StoreError as exc:
            log.warning("cannot interrupt the blocked live-tail read: %s", exc)
        finally:
            self._unblocking = None
