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
- ``ClusterClients.node_pubsub(host, port)``: a ``PubSub`` on a connection of its own to one
  cluster node (the live tail's sharded subscriptions, one connection per primary:
  ``cluster_tail.py``).

Retries: redis-py's ``Retry`` with ``ExponentialWithJitterBackoff`` on connection errors and
timeouts (``ClientOptions``). With Sentinel a retried connect asks the sentinels again, so a
command issued while the primary fails over waits for the new one, within the retries (README
"Redis Sentinel and Redis Cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
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
from redis.exceptions import RedisError

from sidecar.store.url import (
    ClusterTarget,
    Credentials,
    RedisTarget,
    SentinelTarget,
    SingleTarget,
    Tls,
)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    max_connections: int = 8  # the general client's bound (per node on a cluster)
    timeout: float = 2.0  # socket reads and writes; the wait for a free pooled connection
    connect_timeout: float = 2.0
    # redis-py retries a command this many times on connection errors and timeouts, with
    # exponential backoff and full jitter from backoff_base, capped at backoff_cap: about 2 s
    # in all, enough for a blip or a planned failover. A dead primary takes longer to replace
    # (down-after-milliseconds or cluster-node-timeout, plus an election), so the loops that
    # must outlive it (writer, live tail, cancel listener) retry on their own. A cluster
    # pipeline needs at least one retry: only a retry makes it learn the new slot map.
    retries: int = 5
    backoff_base: float = 0.1
    backoff_cap: float = 1.0

    def retry(self) -> Retry:
        backoff = ExponentialWithJitterBackoff(cap=self.backoff_cap, base=self.backoff_base)
        return Retry(backoff, self.retries)


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
            BlockingConnectionPool(
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

    def dedicated(self, *, socket_timeout: float | None) -> Redis:
        return _single_connection(self._pool(socket_timeout))

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


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (finds and follows the primary) with the blocking pool's bound
    (waits for a free connection instead of raising at ``max_connections``)."""


class SentinelClients:
    """A primary found and followed through Sentinel.

    redis-py asks the sentinels for the primary only when it opens a connection, or after a
    ``READONLY`` reply. After ``SENTINEL FAILOVER`` the old primary stays a writable primary
    until the sentinels convert it, 8-10 s later, so every open connection keeps writing there,
    and all of it is lost when it turns into a replica. ``watch_failovers()`` (run it as a
    background task) closes every connection of these clients as soon as a sentinel announces
    ``+switch-master``, so that the next command goes to the new primary.
    """

    def __init__(self, target: SentinelTarget, options: ClientOptions) -> None:
        self.target = target
        self._options = options
        self._pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self.switches = 0  # +switch-master announcements seen for our master
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

    def dedicated(self, *, socket_timeout: float | None) -> Redis:
        return _single_connection(self._pool(socket_timeout))

    def pubsub(self) -> PubSub:
        return Redis.from_pool(self._pool(None, retry=False)).pubsub()

    async def aclose(self) -> None:
        await self.general.aclose()
        await self.sentinel.aclose()

    async def watch_failovers(self) -> None:
        """Listen to every sentinel's ``+switch-master`` until cancelled (see the class doc)."""
        await asyncio.gather(*(self._watch(s) for s in self.sentinel.sentinels))

    async def _watch(self, sentinel: Redis) -> None:
        backoff = self._options.backoff_base
        while True:
            pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe("+switch-master")
                backoff = self._options.backoff_base
                while True:
                    # get_message with a timeout: listen() can swallow a cancellation.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self._switched(sentinel, message["data"])
            except (RedisError, OSError):
                # A sentinel down: the others still announce; try this one again later.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._options.backoff_cap)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _switched(self, sentinel: Redis, data: bytes | str) -> None:
        # "<master> <old ip> <old port> <new ip> <new port>"
        text = data.decode() if isinstance(data, bytes) else data
        if text.split(" ", 1)[0] != self.target.master:
            return
        self.switches += 1
        # Ask the announcing sentinel first: another one may not have switched yet.
        sentinels = self.sentinel.sentinels
        sentinels.insert(0, sentinels.pop(sentinels.index(sentinel)))
        for pool in list(self._pools):
            with contextlib.suppress(RedisError, OSError):
                await pool.disconnect(inuse_connections=False)
            for conn in list(pool._in_use_connections):
                _abort(conn)


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
        """Classic (not sharded) pub/sub: a PUBLISH on any node reaches every node's
        subscribers, so any node will do; ``RedisCluster.pubsub()`` picks one."""
        return self.general.pubsub()

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
