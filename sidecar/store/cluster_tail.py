"""The shared live tail across hash slots: sharded pub/sub wake-ups, then cursor reads.

On Redis Cluster one command may only name keys of one hash slot, and every run is its own slot
(``sse:run:{<id>}``), so the single-node design (one ``XREAD BLOCK ... STREAMS k1 k2 ...`` over
every followed run) would need one blocked connection per run. Instead:

- producer: the append script (and the finalize script), when it added entries and the store
  asked for wake-ups, ends with ``SPUBLISH <stream key>:tail <last seq>``. The channel carries
  the run's hash tag, so it lives in the run's own slot and the script stays slot-local;
- follower (this class, a ``LiveTail``: ``tail.py``): for every followed run,
  ``SSUBSCRIBE <stream key>:tail`` on a connection to
  the primary that owns the slot, one connection per primary whatever the number of streams;
  once Redis confirms a subscription, read the stream from the cursor (``XRANGE``); on every
  wake-up read again from the cursor. The reads of all woken streams go in one pipeline (one
  round trip per node, through the store). Subscribing before reading, and reading from a
  cursor, means nothing is missed and nothing is delivered twice;
- failover or slot migration: the old primary sends ``sunsubscribe`` for the slot's channels,
  or its connection drops: refresh the slot map, subscribe on the new owner, read from the
  cursor.

The same mechanism serves one Redis and Sentinel (one "node", the primary): ``SingleRouting``.
Requires Redis 7.0 (``SSUBSCRIBE``/``SPUBLISH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.background import Background
from sidecar.errors import StoreError
from sidecar.keys import RunId
from sidecar.store.connect import next_message
from sidecar.store.errors import FOREIGN
from sidecar.store.tail import READ_COUNT, StoredEvent, TailListener, retry_delay

if TYPE_CHECKING:
    from sidecar.store.runstore import RunStore

log = logging.getLogger(__name__)

TAIL_SUFFIX = ":tail"
MAX_READS_PER_ROUND = 512  # runs read in one pipelined round
# How long a link waits on its socket before it looks again (shutdown, health); not a poll
# of Redis: nothing is sent.
LISTEN_SECONDS = 1.0
# How often subscriptions are checked against the client's slot map (no Redis command).
RECONCILE_SECONDS = 1.0
CLOSE_SECONDS = 5.0


def tail_channel(stream_key: str) -> str:
    """The wake-up channel of a stream: same hash tag, so same slot, as the stream."""
    return stream_key + TAIL_SUFFIX


class Routing(Protocol):
    """Where a run's channel is subscribed."""

    def owner(self, channel: str) -> str:
        """The name of the node whose connection subscribes ``channel``."""
        ...

    def pubsub(self, node: str) -> PubSub:
        """A PubSub on a dedicated connection to ``node``, without redis-py retries."""
        ...

    async def connect(self) -> None:
        """Learn the topology, if not known yet."""
        ...

    async def refresh(self) -> None:
        """Learn the topology again (after a failover)."""
        ...


@dataclass(eq=False)
class ClusterRouting:
    """The primary of the channel's slot, as the cluster client's slot map says."""

    cluster: RedisCluster
    make_pubsub: Callable[[str, int], PubSub]

    def owner(self, channel: str) -> str:
        node = self.cluster.get_node_from_key(channel)
        if node is None:
            raise RedisConnectionError(f"no node serves the slot of {channel}")
        return str(node.name)

    def pubsub(self, node: str) -> PubSub:
        host, _, port = node.rpartition(":")
        return self.make_pubsub(host, int(port))

    async def connect(self) -> None:
        await self.cluster.initialize()  # at once when it was done

    async def refresh(self) -> None:
        await self.cluster.initialize()
        await self.cluster.nodes_manager.initialize()


@dataclass(eq=False)
class SingleRouting:
    """One Redis, or the primary Sentinel names (its pubsub connection follows a failover)."""

    make_pubsub: Callable[[], PubSub]

    def owner(self, channel: str) -> str:
        return "primary"

    def pubsub(self, node: str) -> PubSub:
        return self.make_pubsub()

    async def connect(self) -> None:
        return None

    async def refresh(self) -> None:
        return None


@dataclass(eq=False)
class _Stream:
    run_id: RunId
    channel: bytes
    cursor: int
    link: _Link | None = None
    subscribed: bool = False  # Redis confirmed the subscription on ``link``


@dataclass(eq=False)
class _Link:
    """One subscribed connection to one node."""

    node: str
    pubsub: PubSub
    streams: dict[bytes, _Stream] = field(default_factory=dict)
    unsubscribing: set[bytes] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


@dataclass
class TailStats:
    """What the tail sent and received (for measurements; cheap counters)."""

    subscribes: int = 0
    wakeups: int = 0
    reads: int = 0  # XRANGE commands
    read_rounds: int = 0  # pipelined rounds of reads
    entries: int = 0
    reroutes: int = 0  # streams subscribed again after a failover or a lost connection


class ClusterTail:
    """Follow many runs from their cursors; hand new entries, in order, to the listener."""

    def __init__(self, store: RunStore, routing: Routing, listener: TailListener) -> None:
        self._store = store
        self._keys = store.keys
        self._routing = routing
        self._listener = listener
        self._streams: dict[RunId, _Stream] = {}
        self._links: dict[str, _Link] = {}
        self._homeless: set[_Stream] = set()  # to (re)subscribe
        self._dirty: dict[_Stream, None] = {}  # to read, in wake-up order
        self._unsubscribe: list[tuple[_Link, bytes]] = []
        self._refresh = False  # learn the topology again before the next subscriptions
        self._failures = 0  # links lost since a subscription was last confirmed
        self._lost_contact = False  # something failed since Redis last answered
        self._route_wake = asyncio.Event()
        self._read_wake = asyncio.Event()
        self._loops = [
            Background("sse-live-tail-router", self._route_loop, store.metrics),
            Background("sse-live-tail", self._read_loop, store.metrics),
        ]
        self._closed = False  # a read that swallowed its cancellation must not go on
        self.stats = TailStats()

    # -- API ------------------------------------------------------------------------------

    def start(self) -> None:
        for loop in self._loops:
            loop.start()

    async def close(self) -> None:
        self._closed = True
        for loop in self._loops:
            await loop.stop()
        links = [link.task for link in self._links.values() if link.task]
        for task in links:
            task.cancel()
        if links:
            # A read that swallows its cancellation (redis-py) ends once its connection closes.
            await asyncio.wait(links, timeout=CLOSE_SECONDS)
        for link in list(self._links.values()):
            await self._close_link(link)

    def follow(self, run_id: RunId, cursor: int) -> None:
        """Deliver the entries of ``run_id`` after ``cursor``, now and as they come."""
        stream = self._streams.get(run_id)
        if stream is not None:
            if cursor < stream.cursor:
                stream.cursor = cursor
                if stream.subscribed:
                    self._mark_dirty(stream)
            return
        stream = _Stream(run_id, tail_channel(self._keys.stream(run_id)).encode(), cursor)
        self._streams[run_id] = stream
        self._homeless.add(stream)
        self._route_wake.set()

    def unfollow(self, run_id: RunId) -> None:
        stream = self._streams.pop(run_id, None)
        if stream is None:
            return
        self._homeless.discard(stream)
        self._dirty.pop(stream, None)
        link = stream.link
        if link is not None and link.streams.get(stream.channel) is stream:
            del link.streams[stream.channel]
            link.unsubscribing.add(stream.channel)
            self._unsubscribe.append((link, stream.channel))
            self._route_wake.set()

    def stored(self, run_id: RunId, events: Sequence[StoredEvent]) -> None:
        """On a cluster every followed run is read after its wake-up, this process's own too
        (``BlockingTail`` serves those from the writer's reports instead)."""

    def abandoned(self, run_id: RunId) -> None:
        pass

    @property
    def nodes(self) -> list[str]:
        """The nodes this tail holds a subscribed connection to (one each)."""
        return sorted(self._links)

    # -- failures -------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self._lost_contact = True
        error = exc if isinstance(exc, StoreError) else self._store.failed("follow", exc)
        self._listener.failed(error)

    def _answered(self) -> None:
        """Redis answered (a subscription confirmed, a read done)."""
        self._store.health.ok()
        if self._lost_contact:
            self._lost_contact = False
            self._listener.recovered()

    # -- subscriptions --------------------------------------------------------------------

    async def _route_loop(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._route_wake.wait(), RECONCILE_SECONDS)
            self._route_wake.clear()
            self._reconcile()
            if self._failures:
                await asyncio.sleep(retry_delay(self._failures))
            if self._refresh or self._failures:
                self._refresh = False
                try:
                    await self._routing.refresh()
                except FOREIGN as exc:
                    log.warning("cannot learn the Redis topology, retrying: %s", exc)
                    self._failed(exc)
                    self._failures += 1
                    self._route_wake.set()
                    continue
            while self._unsubscribe:
                link, channel = self._unsubscribe.pop()
                if self._links.get(link.node) is not link:
                    continue  # dropped meanwhile: its subscriptions went with its connection
                with contextlib.suppress(*FOREIGN):
                    await link.pubsub.execute_command("SUNSUBSCRIBE", channel)
            if not await self._route():
                self._failures += 1
                self._route_wake.set()

    async def _route(self) -> bool:
        """Subscribe every homeless run on its owner's link; False if some must wait."""
        if self._homeless:
            try:
                await self._routing.connect()
            except FOREIGN as exc:
                log.warning("cannot learn the Redis topology, retrying: %s", exc)
                self._failed(exc)
                return False
        for stream in list(self._homeless):
            if self._streams.get(stream.run_id) is not stream:
                self._homeless.discard(stream)
                continue
            try:
                link = await self._link(self._routing.owner(stream.channel.decode()))
                stream.link, stream.subscribed = link, False
                link.streams[stream.channel] = stream
                link.unsubscribing.discard(stream.channel)
                self._homeless.discard(stream)
                await link.pubsub.execute_command("SSUBSCRIBE", stream.channel)
                self.stats.subscribes += 1
            except FOREIGN as exc:
                log.warning("cannot subscribe to %s, retrying: %s", stream.channel, exc)
                self._failed(exc)
                self._homeless.add(stream)
                if stream.link is not None:
                    await self._drop_link(stream.link)
                return False
        return True

    def _reconcile(self) -> None:
        """Move subscriptions whose node no longer owns their slot, as the client's slot map
        (kept current by the MOVED replies of all traffic) now says. Made on a stale map
        during a failover, they may sit on a replica (which relays the shard's messages)."""
        for stream in list(self._streams.values()):
            link = stream.link
            if link is None or not stream.subscribed:
                continue
            try:
                owner = self._routing.owner(stream.channel.decode())
            except FOREIGN:
                continue
            if owner != link.node:
                del link.streams[stream.channel]
                link.unsubscribing.add(stream.channel)
                self._unsubscribe.append((link, stream.channel))
                self._rehome(stream)

    async def _link(self, node: str) -> _Link:
        link = self._links.get(node)
        if link is None:
            pubsub = self._routing.pubsub(node)
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]  # before get_message
            except BaseException:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            link = _Link(node, pubsub)
            self._links[node] = link
            link.task = asyncio.create_task(self._listen(link), name=f"sse-tail-link-{node}")
        return link

    async def _listen(self, link: _Link) -> None:
        try:
            while True:
                message = await next_message(link.pubsub, LISTEN_SECONDS)
                if message is None:
                    continue
                self._on_message(link, message)
                if not link.streams and not link.unsubscribing:
                    break  # nothing followed here any more (unfollowed, or the slots moved)
        except FOREIGN as exc:
            # The node died, or refused a subscription (e.g. MOVED: it no longer owns a slot).
            log.warning("live-tail link to %s lost, resubscribing elsewhere: %s", link.node, exc)
            self._failed(exc)
            self._failures += 1
        except Exception:
            log.exception("live-tail link to %s failed, resubscribing", link.node)
            self._lost_contact = True
            self._failures += 1
        link.task = None
        await self._drop_link(link)

    def _on_message(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        stream = link.streams.get(channel)
        if kind == "smessage":
            self.stats.wakeups += 1
            if stream is not None and stream.subscribed:
                self._mark_dirty(stream)
        elif kind == "ssubscribe":
            if stream is not None:
                stream.subscribed = True
                self._failures = 0
                self._answered()
                self._mark_dirty(stream)  # catch up: everything after this will wake us
        elif kind == "sunsubscribe":
            if channel in link.unsubscribing:
                link.unsubscribing.discard(channel)
            elif stream is not None:
                # Not asked for: the slot moved (failover, migration). Subscribe on its owner.
                del link.streams[channel]
                self._refresh = True
                self._rehome(stream)

    def _rehome(self, stream: _Stream) -> None:
        stream.link, stream.subscribed = None, False
        self._dirty.pop(stream, None)
        if self._streams.get(stream.run_id) is stream:
            self.stats.reroutes += 1
            self._homeless.add(stream)
            self._route_wake.set()

    async def _drop_link(self, link: _Link) -> None:
        if self._links.get(link.node) is link:
            del self._links[link.node]
        for stream in list(link.streams.values()):
            self._rehome(stream)
        link.streams.clear()
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
        await self._close_link(link)

    async def _close_link(self, link: _Link) -> None:
        with contextlib.suppress(*FOREIGN):
            await link.pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- reads ----------------------------------------------------------------------------

    def _mark_dirty(self, stream: _Stream) -> None:
        self._dirty[stream] = None
        self._read_wake.set()

    async def _read_loop(self) -> None:
        failures = 0
        while not self._closed:
            await self._read_wake.wait()
            self._read_wake.clear()
            while self._dirty:
                if await self._read_round():
                    failures = 0
                else:
                    failures += 1
                    await asyncio.sleep(retry_delay(failures))

    async def _read_round(self) -> bool:
        batch = []
        for stream in list(self._dirty):
            del self._dirty[stream]
            batch.append((stream, stream.cursor))
            if len(batch) >= MAX_READS_PER_ROUND:
                break
        try:
            pages = await self._store.read_after(
                [(stream.run_id, cursor) for stream, cursor in batch], READ_COUNT
            )
        except StoreError as exc:
            log.warning("live-tail read failed, retrying: %s", exc)
            self._failed(exc)
            for stream, _ in batch:
                if self._streams.get(stream.run_id) is stream:
                    self._mark_dirty(stream)
            return False
        self._answered()
        self.stats.read_rounds += 1
        self.stats.reads += len(batch)
        for (stream, cursor), entries in zip(batch, pages, strict=True):
            if self._streams.get(stream.run_id) is not stream:
                continue  # unfollowed meanwhile
            # A cursor lowered (follow) while this read was in flight: read again from there.
            if stream.cursor != cursor:
                self._mark_dirty(stream)
                continue
            if entries:
                stream.cursor = entries[-1].seq
                self.stats.entries += len(entries)
                self._listener.deliver(stream.run_id, cursor, entries)
            if len(entries) >= READ_COUNT:
                self._mark_dirty(stream)
        return True
