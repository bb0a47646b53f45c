"""sidecar/store/connect.py: each target becomes the redis-py clients it should, with its auth,
TLS, bounds and retries where they belong (data nodes vs sentinels). No I/O: building the
clients does not connect."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from sidecar.store import connect as connect_module
from sidecar.store.connect import (
    BlockingSentinelConnectionPool,
    ClientOptions,
    ClusterClients,
    SentinelClients,
    SingleClients,
    connect,
    next_message,
)
from sidecar.store.url import parse_redis_url

OPTIONS = ClientOptions(max_connections=5, timeout=1.5, connect_timeout=0.7, retries=4)


def kwargs_of(pool: ConnectionPool) -> dict[str, Any]:
    return dict(pool.connection_kwargs)


async def test_a_single_tls_redis_gets_a_bounded_blocking_pool_with_its_tls_and_auth() -> None:
    url = "rediss://app:pw@redis.internal:6380/2?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional"
    clients = connect(parse_redis_url(url), OPTIONS)
    assert isinstance(clients, SingleClients)
    pool = clients.general.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert pool.max_connections == 5
    assert pool.timeout == 1.5
    assert pool.connection_class is SSLConnection
    kw = kwargs_of(pool)
    assert (kw["host"], kw["port"], kw["db"]) == ("redis.internal", 6380, 2)
    assert (kw["username"], kw["password"]) == ("app", "pw")
    assert (kw["ssl_ca_certs"], kw["ssl_cert_reqs"], kw["ssl_check_hostname"]) == (
        "/ca.pem",
        "optional",
        True,
    )
    assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (1.5, 0.7)
    assert kw["retry"].get_retries() == 4
    dedicated = clients.dedicated(socket_timeout=None)
    assert dedicated.single_connection_client
    assert kwargs_of(dedicated.connection_pool)["socket_timeout"] is None
    assert dedicated.connection_pool.connection_class is SSLConnection
    pubsub = clients.pubsub()
    # A subscribed connection is never retried by redis-py: its owner resubscribes.
    assert kwargs_of(pubsub.connection_pool)["retry"].get_retries() == 0
    await dedicated.aclose()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await clients.aclose()


async def test_a_unix_socket_redis() -> None:
    clients = connect(parse_redis_url("unix://:pw@/run/redis.sock?db=3"), OPTIONS)
    assert isinstance(clients, SingleClients)
    pool = clients.general.connection_pool
    assert pool.connection_class is UnixDomainSocketConnection
    kw = kwargs_of(pool)
    assert (kw["path"], kw["db"], kw["password"]) == ("/run/redis.sock", 3, "pw")
    await clients.aclose()


async def test_sentinel_auth_and_tls_go_to_the_sentinels_and_the_data_nodes_separately() -> None:
    url = (
        "rediss+sentinel://:data-pw@s1:26379,s2:26380/mymaster/4"
        "?sentinel_password=sent-pw&ssl_ca_certs=/ca.pem"
    )
    clients = connect(parse_redis_url(url), OPTIONS)
    assert isinstance(clients, SentinelClients)
    pool = clients.general.connection_pool
    assert isinstance(pool, BlockingSentinelConnectionPool)
    assert isinstance(pool, BlockingConnectionPool)  # waits for a connection at the bound
    assert pool.max_connections == 5
    assert pool.service_name == "mymaster"
    assert issubclass(pool.connection_class, SSLConnection)
    kw = kwargs_of(pool)
    assert (kw["password"], kw["db"], kw["ssl_ca_certs"]) == ("data-pw", 4, "/ca.pem")
    sentinels = clients.sentinel.sentinels
    assert [kwargs_of(s.connection_pool)["port"] for s in sentinels] == [26379, 26380]
    for sentinel in sentinels:
        skw = kwargs_of(sentinel.connection_pool)
        assert skw["password"] == "sent-pw"
        assert sentinel.connection_pool.connection_class is SSLConnection
    await clients.aclose()


async def test_sentinels_can_stay_on_plain_tcp_while_the_data_nodes_use_tls() -> None:
    url = "rediss+sentinel://s1/m?sentinel_ssl=false"
    clients = connect(parse_redis_url(url), OPTIONS)
    assert isinstance(clients, SentinelClients)
    assert issubclass(clients.general.connection_pool.connection_class, SSLConnection)
    (sentinel,) = clients.sentinel.sentinels
    assert not issubclass(sentinel.connection_pool.connection_class, SSLConnection)
    assert kwargs_of(sentinel.connection_pool).get("password") is None
    await clients.aclose()


async def test_a_cluster_gets_its_startup_nodes_a_per_node_bound_and_a_slot_semaphore() -> None:
    url = "rediss+cluster://u:pw@n1:7000,n2:7001?ssl_cert_reqs=none"
    clients = connect(parse_redis_url(url), OPTIONS)
    assert isinstance(clients, ClusterClients)
    cluster = clients.general
    startup = cluster.nodes_manager.startup_nodes
    assert sorted(startup) == ["n1:7000", "n2:7001"]
    node_kwargs = next(iter(startup.values())).connection_kwargs
    assert (node_kwargs["username"], node_kwargs["password"]) == ("u", "pw")
    assert node_kwargs["ssl_cert_reqs"] == "none"
    assert next(iter(startup.values())).max_connections == 5
    assert cluster.retry.get_retries() == 4
    assert clients.slots._value == 5
    pubsub = clients.node_pubsub("n1", 7000)
    assert pubsub.connection_pool.connection_class is SSLConnection
    assert kwargs_of(pubsub.connection_pool)["retry"].get_retries() == 0
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await clients.aclose()


# -- Sentinel: writes held while a failover is announced -------------------------------------


def sentinel_clients() -> SentinelClients:
    clients = connect(parse_redis_url("redis+sentinel://s1:26379,s2:26379/mymaster/0"), OPTIONS)
    assert isinstance(clients, SentinelClients)
    return clients


async def test_a_failover_of_our_master_holds_writes_until_the_switch() -> None:
    clients = sentinel_clients()
    sentinel = clients.sentinel.sentinels[1]
    assert await clients.wait_writable(0.01)
    # Another master's failover: nothing held.
    await clients._announced(sentinel, "+try-failover", "master other 10.0.0.9 6379")
    assert await clients.wait_writable(0.01)
    for channel, details in [
        ("+try-failover", "master mymaster 10.0.0.1 6379"),
        ("+selected-slave", "slave 10.0.0.2:6379 10.0.0.2 6379 @ mymaster 10.0.0.1 6379"),
        ("+failover-state-send-slaveof-noone", "slave 10.0.0.2:6379 10.0.0.2 6379 @ mymaster x 1"),
    ]:
        await clients._announced(sentinel, channel, details)
        assert not await clients.wait_writable(0.01), channel
    assert clients.pauses == 1  # one failover, however many steps it announced
    waiting = asyncio.create_task(clients.wait_writable(5))
    await clients._announced(sentinel, b"+switch-master", b"mymaster 10.0.0.1 6379 10.0.0.2 6379")
    assert await waiting
    assert clients.switches == 1
    # The announcing sentinel is asked first from now on.
    assert clients.sentinel.sentinels[0] is sentinel
    await clients.aclose()


async def test_a_failover_that_fails_or_goes_silent_releases_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clients = sentinel_clients()
    sentinel = clients.sentinel.sentinels[0]
    await clients._announced(sentinel, "+elected-leader", "master mymaster 10.0.0.1 6379")
    assert not await clients.wait_writable(0.01)
    await clients._announced(sentinel, "+failover-end-for-timeout", "master mymaster 10.0.0.1 1")
    assert await clients.wait_writable(0.01)
    monkeypatch.setattr(connect_module, "WRITE_PAUSE_SECONDS", 0.05)
    await clients._announced(sentinel, "+try-failover", "master mymaster 10.0.0.1 6379")
    assert not await clients.wait_writable(0.01)
    assert await clients.wait_writable(1.0)  # no news for WRITE_PAUSE_SECONDS: released
    assert clients.pauses == 2
    await clients.aclose()


@pytest.mark.parametrize(
    ("details", "master"),
    [
        ("master mymaster 10.0.0.1 6379", "mymaster"),
        ("master mymaster 10.0.0.1 6379 #quorum 2/2", "mymaster"),
        ("slave 10.0.0.2:6379 10.0.0.2 6379 @ mymaster 10.0.0.1 6379", "mymaster"),
        ("sentinel 10.0.0.7:26379 10.0.0.7 26379 @ other 10.0.0.1 6379", "other"),
        ("slave 10.0.0.2:6379 10.0.0.2 6379", None),
        ("", None),
    ],
)
def test_the_master_an_announcement_is_about(details: str, master: str | None) -> None:
    assert connect_module._master_of(details) == master


async def test_a_cluster_cancel_subscription_needs_no_slot_map() -> None:
    """Before the first command (or after redis-py dropped its slot map on an error) the cancel
    subscription goes to a startup node instead of failing."""
    clients = connect(parse_redis_url("redis+cluster://n1:7000,n2:7001"), OPTIONS)
    assert isinstance(clients, ClusterClients)
    assert not clients.general.nodes_manager.nodes_cache
    pubsub = clients.pubsub()
    kw = kwargs_of(pubsub.connection_pool)
    assert (kw["host"], kw["port"]) in {("n1", 7000), ("n2", 7001)}
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await clients.aclose()


class SwallowingPubSub:
    """A subscription read that turns its task's cancellation into "no message", as redis-py's
    ``get_message`` does when the cancellation coincides with its read timeout."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_message(self, timeout: float, **_options: Any) -> None:
        self.reads += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(timeout)


async def test_a_cancellation_swallowed_by_a_subscription_read_still_ends_the_loop() -> None:
    pubsub = SwallowingPubSub()

    async def listen() -> None:
        for _ in range(3):  # bounded: a loop that runs on fails the test instead of hanging it
            await next_message(pubsub, 0.05)  # type: ignore[arg-type]

    task = asyncio.create_task(listen())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert pubsub.reads == 1
