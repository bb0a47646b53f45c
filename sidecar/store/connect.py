"""redis-py asyncio clients for a parsed target: one bounded general client, and the dedicated
connections the sidecar keeps besides it.

- ``general``: every command that comes and goes (writer round trips, claims, catch-up reads,
  status, the cancel publish). One Redis or Sentinel: a ``BlockingConnectionPool`` of
  ``max_connections`` (a caller waits up to ``timeout`` for a free connection; with Sentinel the
  pool asks the sentinels for the primary and follows a failover). Cluster: a ``RedisCluster``
  with ``max_connections`` per node; redis-py *raises* ``MaxConnectionsError`` instead of waiting
  when a node's connections are all busy, so ``ClusterClients.slots`` bounds the commands in
  flight (one slot per command or pipeline: at most one connection per node each).
- ``dedicated(...)`` (one Redis, Sentinel): a client with one connection of its own, for the
  shared live tail's blocked ``XREAD`` (it spends its life blocked, so it must not hold a pooled
  connection).
- ``pubsub()``: a ``PubSub`` on a connection of its own (the cancel channel; on a cluster, a
  classic ``PUBLISH`` reaches every node, so one connection to any node will do).
- ``trim_idle(pool)``: closes the general pool's connections that sat unused for
  ``POOL_IDLE_SECONDS`` (run it as a supervised background task; one Redis and Sentinel).
- ``SentinelClients.watch_failovers()``: follows the sentinels' announcements (run it as a
  supervised background task), and ``wait_writable`` holds writes while a failover is under way.
- ``ClusterClients.node_pubsub(host, port)``: a ``PubSub`` on a connection of its own to one
  cluster node (the live tail's sharded subscriptions, one connection per primary:
  ``cluster_tail.py``).

Retries: redis-py's ``Retry`` with ``ExponentialWithJitterBackoff`` on connection errors
(``ClientOptions``): a pooled connection that died while idle (Redis restarted, failed over, or
the network reset it) costs a resend on a fresh one, not an error. Timeouts are not retried: a
hung Redis must not cost a caller several timeouts. With Sentinel a retried connect asks the
sentinels again, so a command issued while the primary fails over waits for the new one, within
the retries (README "Redis Sentinel and Redis Cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sidecar.store.url import (
    ClusterTarget,
    Credentials,
    RedisTarget,
    SentinelTarget,
    SingleTarget,
    Tls,
)


async def next_message(pubsub: PubSub, timeout: float, **options: Any) -> dict[str, Any] | None:
    """``pubsub.get_message`` that never swallows its task's cancellation.

    Every subscribed loop here reads with a timeout rather than ``listen()``, which can swallow
    the cancellation that stops its task. ``get_message`` can too: redis-py turns a timeout
    context's TimeoutError into "no message", and a cancellation that coincides with it is
    lost; the loop then runs on and the task never ends (a shutdown, or a test's teardown, hung
    on it for a minute). A cancellation asked of the task is raised again here."""
    message = await pubsub.get_message(timeout=timeout, **options)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return message  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class ClientOptions:
    max_connections: int = 8  # the general client's bound (per node on a cluster)
    timeout: float = 2.0  # socket reads and writes; the wait for a free pooled connection
    connect_timeout: float = 2.0
    # redis-py retries a command this many times on connection errors, with exponential
    # backoff and full jitter from backoff_base, capped at backoff_cap: about 2 s in all,
    # enough for a blip or a planned failover. A dead primary takes longer to replace
    # (down-after-milliseconds or cluster-node-timeout, plus an election), so the loops that
    # must outlive it (writer, live tail, cancel listener) retry on their own. A cluster
    # pipeline needs at least one retry: only a retry makes it learn the new slot map.
    retries: int = 5
    backoff_base: float = 0.1
    backoff_cap: float = 1.0

    def retry(self) -> Retry:
        backoff = ExponentialWithJitterBackoff(cap=self.backoff_cap, base=self.backoff_base)
        return Retry(backoff, self.retries, supported_errors=(RedisConnectionError,))


def _auth(credentials: Credentials) -> dict[str, Any]:
    return {"username": credentials.username, "password": credentials.password}


def _tls(tls: Tls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {
        "ssl_ca_certs": tls.ca_certs,
        "ssl_certfile": tls.certfile,
        "ssl_keyfile": tls.keyfile,
        "ssl_cert_reqs": tls.cert_reqs,
        "ssl_check_hostname": tls.check_hostname,
    }


def _socket(
    options: ClientOptions, socket_timeout: float | None, *, retry: bool = True
) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        # Subscribed connections are not retried by redis-py: after a reconnect their
        # subscriptions would be gone without their owner knowing. The owner resubscribes.
        "retry": options.retry() if retry else Retry(NoBackoff(), 0),
    }


# A pooled connection unused for this long is closed (one Redis, Sentinel): a burst (1,000 replay
# starts, a backlog of writes) opens up to ``max_connections``, and redis-py keeps every
# connection it opened for the life of the pool.
POOL_IDLE_SECONDS = 10.0


class TrimmedPool(BlockingConnectionPool):
    """redis-py's blocking pool, plus ``stale``: the free connections unused for a while, taken
    out of the pool to be closed.

    Hand-written because redis-py has no idle timeout. Its free list is a stack (a release
    appends, a checkout takes the last), so under light load the same connection or two serve
    every command while the rest age at the list's head; a connection in use is never touched.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._released: weakref.WeakKeyDictionary[AbstractConnection, float] = (
            weakref.WeakKeyDictionary()
        )

    async def release(self, connection: AbstractConnection) -> None:
        self._released[connection] = time.monotonic()
        await super().release(connection)

    def stale(self, idle_seconds: float) -> list[AbstractConnection]:
        """Take the free connections unused for ``idle_seconds`` out of the pool, oldest first,
        keeping the newest one (the caller disconnects them). Synchronous, so no checkout can
        interleave: what it takes, the pool no longer hands out."""
        cutoff = time.monotonic() - idle_seconds
        free: list[AbstractConnection] = self._available_connections  # oldest first
        out: list[AbstractConnection] = []
        while len(free) > 1 and self._released.get(free[0], 0.0) < cutoff:
            out.append(free.pop(0))
        return out


async def trim_idle(pool: ConnectionPool, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
    """Forever: close the pool's connections that sat unused for ``idle_seconds``."""
    assert isinstance(pool, TrimmedPool)
    while True:
        await asyncio.sleep(idle_seconds / 4)
        for connection in pool.stale(idle_seconds):
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await connection.disconnect()


class SingleClients:
    """One Redis (TCP, TLS or a Unix socket)."""

    def __init__(self, target: SingleTarget, options: ClientOptions) -> None:
        self.target = target
        self._options = options
        self._kwargs: dict[str, Any] = {"db": target.db, **_auth(target.credentials)}
        if target.endpoint is None:
            self._kwargs.update(
                connection_class=UnixDomainSocketConnection, path=target.socket_path
            )
        else:
            self._kwargs.update(host=target.endpoint.host, port=target.endpoint.port)
            if target.tls is not None:
                self._kwargs.update(connection_class=SSLConnection, **_tls(target.tls))
        self.general = Redis.from_pool(
            TrimmedPool(
                max_connections=options.max_connections,
                timeout=options.timeout,
                **self._kwargs,
                **_socket(options, options.timeout),
            )
        )

    def _pool(self, socket_timeout: float | None, *, retry: bool = True) -> ConnectionPool:
        return ConnectionPool(
            max_connections=1,
            **self._kwargs,
            **_socket(self._options, socket_timeout, retry=retry),
        )

    def dedicated(self, *, socket_timeout: float | None, retry: bool = True) -> Redis:
        return _single_connection(self._pool(socket_timeout, retry=retry))

    def pubsub(self) -> PubSub:
        return Redis.from_pool(self._pool(None, retry=False)).pubsub()

    async def aclose(self) -> None:
        await self.general.aclose()


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that Sentinel names. In redis-py 8 a connection that dropped
    and is used again (a retried command, a single-connection client) reconnects to the address
    it had, not through the sentinels (redis-py #3874): after a failover it would keep reaching
    the old primary, now a replica (which still serves reads). Reconnect through ``connect()``,
    which asks the sentinels."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class _PrimarySSLConnection(_PrimaryConnection, SSLConnection):
    pass


SWITCH_MASTER = "+switch-master"
# What the leading sentinel announces while it fails the primary over, from its attempt to the
# reconfiguration of the replicas; each one (re)starts the write pause.
FAILOVER_STEPS = (
    "+try-failover",
    "+elected-leader",
    "+failover-state-select-slave",
    "+selected-slave",
    "+failover-state-send-slaveof-noone",
    "+failover-state-wait-promotion",
    "+promoted-slave",
    "+failover-state-reconf-slaves",
    "+slave-reconf-sent",
    "+slave-reconf-inprog",
    "+slave-reconf-done",
    "+failover-end-for-timeout",
)
# A failover that failed: the old primary stays.
FAILOVER_FAILED = "+failover-end-for-timeout"
# How long writes stay paused after the last announcement of a failover that never ends.
WRITE_PAUSE_SECONDS = 5.0


class BlockingSentinelConnectionPool(SentinelConnectionPool, TrimmedPool):
    """redis-py's Sentinel pool (finds and follows the primary) with the blocking pool's bound
    (waits for a free connection instead of raising at ``max_connections``) and idle trim."""


class SentinelClients:
    """A primary found and followed through Sentinel.

    redis-py asks the sentinels for the primary only when it opens a connection, or after a
    ``READONLY`` reply. After ``SENTINEL FAILOVER`` the old primary stays a writable primary
    until the sentinels convert it, 8-10 s later, so every open connection keeps writing there,
    and all of it is lost when it turns into a replica. ``watch_failovers()`` (run it as a
    background task) closes every connection of these clients as soon as a sentinel announces
    ``+switch-master``, so that the next command goes to the new primary.

    That still leaves the writes acknowledged by the old primary between the promotion of its
    replica and the announcement (about a second): the replica no longer gets them, so they are
    lost. The sentinel that leads a failover announces each step of it, and the promotion comes
    a few sentinel ticks (50-100 ms each) after ``+try-failover``: from the first of those
    announcements until ``+switch-master`` the watch closes ``writes`` (``wait_writable``), so
    the store holds its writes while the round trips already sent land on the old primary and
    reach the replica before it is promoted. A failover that never announces its end reopens
    them ``WRITE_PAUSE_SECONDS`` after its last announcement.
    """

    def __init__(self, target: SentinelTarget, options: ClientOptions) -> None:
        self.target = target
        self._options = options
        self._pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self.switches = 0  # +switch-master announcements seen for our master
        self.pauses = 0  # failovers of our master whose start paused the writes
        self._writes = asyncio.Event()
        self._writes.set()
        self._paused_until = 0.0
        self._reopen: asyncio.TimerHandle | None = None
        sentinel_kwargs: dict[str, Any] = {
            **_auth(target.sentinel_credentials),
            "socket_timeout": options.timeout,
            "socket_connect_timeout": options.connect_timeout,
        }
        if target.sentinel_tls is not None:
            sentinel_kwargs.update(ssl=True, **_tls(target.sentinel_tls))
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [(e.host, e.port) for e in target.sentinels], sentinel_kwargs=sentinel_kwargs
        )
        self._kwargs: dict[str, Any] = {
            "db": target.db,
            **_auth(target.credentials),
            "connection_class": _PrimarySSLConnection if target.tls else _PrimaryConnection,
            **_tls(target.tls),
        }
        pool = BlockingSentinelConnectionPool(  # type: ignore[no-untyped-call]
            target.master,
            self.sentinel,
            max_connections=options.max_connections,
            timeout=options.timeout,
            **self._kwargs,
            **_socket(options, options.timeout),
        )
        self._pools.add(pool)
        self.general = Redis.from_pool(pool)

    def _pool(self, socket_timeout: float | None, *, retry: bool = True) -> SentinelConnectionPool:
        pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            self.target.master,
            self.sentinel,
            max_connections=1,
            **self._kwargs,
            **_socket(self._options, socket_timeout, retry=retry),
        )
        self._pools.add(pool)
        return pool

    def dedicated(self, *, socket_timeout: float | None, retry: bool = True) -> Redis:
        return _single_connection(self._pool(socket_timeout, retry=retry))

    def pubsub(self) -> PubSub:
        return Redis.from_pool(self._pool(None, retry=False)).pubsub()

    async def aclose(self) -> None:
        await self.general.aclose()
        await self.sentinel.aclose()

    async def wait_writable(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until no failover of the primary is in progress."""
        if self._writes.is_set():
            return True
        try:
            await asyncio.wait_for(self._writes.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def watch_failovers(self) -> None:
        """Listen to every sentinel's failover announcements until cancelled (class doc)."""
        try:
            await asyncio.gather(*(self._watch(s) for s in self.sentinel.sentinels))
        finally:
            self._open_writes()

    async def _watch(self, sentinel: Redis) -> None:
        backoff = self._options.backoff_base
        while True:
            pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(SWITCH_MASTER, *FAILOVER_STEPS)
                backoff = self._options.backoff_base
                while True:
                    message = await next_message(pubsub, 1.0, ignore_subscribe_messages=True)
                    if message is not None:
                        await self._announced(sentinel, message["channel"], message["data"])
            except (RedisError, OSError):
                # A sentinel down: the others still announce; try this one again later.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._options.backoff_cap)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _announced(self, sentinel: Redis, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        text = data.decode() if isinstance(data, bytes) else data
        if name == SWITCH_MASTER:
            # "<master> <old ip> <old port> <new ip> <new port>"
            if text.split(" ", 1)[0] == self.target.master:
                await self._switched(sentinel)
        elif _master_of(text) == self.target.master:
            if name == FAILOVER_FAILED:
                self._open_writes()
            else:
                self._pause_writes()

    def _pause_writes(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writes.is_set():
            self.pauses += 1
            self._writes.clear()
        self._paused_until = loop.time() + WRITE_PAUSE_SECONDS
        if self._reopen is None:
            self._reopen = loop.call_later(WRITE_PAUSE_SECONDS, self._reopen_if_due)

    def _reopen_if_due(self) -> None:
        self._reopen = None
        left = self._paused_until - asyncio.get_running_loop().time()
        if left > 0:
            self._reopen = asyncio.get_running_loop().call_later(left, self._reopen_if_due)
        else:
            self._open_writes()

    def _open_writes(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        self._writes.set()

    async def _switched(self, sentinel: Redis) -> None:
        self.switches += 1
        # Ask the announcing sentinel first: another one may not have switched yet.
        sentinels = self.sentinel.sentinels
        sentinels.insert(0, sentinels.pop(sentinels.index(sentinel)))
        for pool in list(self._pools):
            with contextlib.suppress(RedisError, OSError):
                await pool.disconnect(inuse_connections=False)
            for conn in list(pool._in_use_connections):
                _abort(conn)
        self._open_writes()


def _master_of(details: str) -> str | None:
    """The master an announcement is about: ``master <name> <ip> <port> ...`` or
    ``<type> <name> <ip> <port> @ <master> <ip> <port>``."""
    if " @ " in details:
        return details.split(" @ ", 1)[1].split(" ", 1)[0]
    parts = details.split(" ")
    return parts[1] if len(parts) > 1 and parts[0] == "master" else None


def abort(client: Redis) -> None:
    """Drop the connection of a single-connection client, under a command another task may be
    waiting on (which then fails at once with a ConnectionError)."""
    if client.connection is not None:
        _abort(client.connection)


def _abort(conn: AbstractConnection) -> None:
    """Drop a connection another task is using (e.g. blocked in XREAD): its command fails with
    a ConnectionError, which redis-py's retry answers on a new connection, asking the sentinels
    again. ``disconnect()`` from here would instead hang that task's pending read (redis-py 8
    tears its parser down under it)."""
    writer = getattr(conn, "_writer", None)
    if writer is not None:
        writer.transport.abort()


@dataclass(eq=False)
class ClusterClients:
    """A Redis Cluster: redis-py's ``RedisCluster`` routes every command to its slot's node."""

    target: ClusterTarget
    options: ClientOptions
    general: RedisCluster = field(init=False)
    # Hold one per command or pipeline on ``general``: with at most ``max_connections`` of them
    # in flight, no node needs more connections than that, and callers wait instead of failing.
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._kwargs: dict[str, Any] = {**_auth(self.target.credentials)}
        if self.target.tls is not None:
            self._kwargs.update(ssl=True, **_tls(self.target.tls))
        self.general = RedisCluster(
            startup_nodes=[ClusterNode(e.host, e.port) for e in self.target.startup_nodes],
            max_connections=self.options.max_connections,
            **self._kwargs,
            **_socket(self.options, self.options.timeout),
        )
        self.slots = asyncio.Semaphore(self.options.max_connections)

    def _node_pool(self, host: str, port: int, *, retry: bool) -> ConnectionPool:
        kwargs = {k: v for k, v in self._kwargs.items() if k != "ssl"}
        if self.target.tls is not None:
            kwargs["connection_class"] = SSLConnection
        return ConnectionPool(
            host=host,
            port=port,
            max_connections=1,
            **kwargs,
            **_socket(self.options, None, retry=retry),
        )

    def node_pubsub(self, host: str, port: int) -> PubSub:
        """A PubSub on a connection of its own to one node (not routed, no redirects)."""
        return Redis.from_pool(self._node_pool(host, port, retry=False)).pubsub()

    def pubsub(self) -> PubSub:
        """Classic (not sharded) pub/sub, on a connection of its own: a PUBLISH on any node
        reaches every node's subscribers, so any node will do. A random one of the known nodes,
        so that a subscriber whose node died tries another (``RedisCluster.pubsub()`` would
        borrow a connection of the node's bounded pool, and pick the same node again)."""
        known = list(self.general.nodes_manager.nodes_cache.values())
        if known:
            node = random.choice(known)
            return self.node_pubsub(node.host, int(node.port))
        # Not connected yet, or the slot map was dropped after an error: a startup node.
        endpoint = random.choice(self.target.startup_nodes)
        return self.node_pubsub(endpoint.host, endpoint.port)

    async def refresh(self) -> None:
        """Ask the cluster for its slot map again (after a node was lost)."""
        await self.general.nodes_manager.initialize()

    async def aclose(self) -> None:
        await self.general.aclose()


RedisClients = SingleClients | SentinelClients | ClusterClients


def connect(target: RedisTarget, options: ClientOptions) -> RedisClients:
    """Build (without connecting: the first command connects) the clients for ``target``."""
    if isinstance(target, SingleTarget):
        return SingleClients(target, options)
    if isinstance(target, SentinelTarget):
        return SentinelClients(target, options)
    return ClusterClients(target, options)


def _single_connection(pool: ConnectionPool) -> Redis:
    """A client that keeps one connection for itself and owns (and closes) ``pool``."""
    client = Redis(connection_pool=pool, single_connection_client=True)
    client.auto_close_connection_pool = True
    return client
