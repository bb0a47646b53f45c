"""Redis Sentinel (1 primary, 1 replica, 3 sentinels) under the clients of
sidecar/store/connect.py: what the store can build on.

- After ``SENTINEL FAILOVER`` the old primary stays a writable primary until the sentinels
  convert it (8-10 s later); open connections keep writing there and all of it is lost. The
  ``+switch-master`` watch moves every connection (pooled, dedicated, pub/sub) to the new primary
  as soon as a sentinel announces it; without it, writes keep going to the old primary.
- Writes acknowledged between the promotion and the announcement are still lost, unless the
  writer holds its writes from the failover's first announcement (``+try-failover``, a few
  sentinel ticks before the promotion) until ``+switch-master`` (``wait_writable``, what the
  store does), or counts a write as done only once ``WAIT 1`` saw it on a replica.
- After a SIGKILL of the primary, commands wait for the new one (redis-py's retries) and the
  few that outlast the retries fail with ConnectionError (MasterNotFoundError among them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from sidecar.store.connect import WRITE_PAUSE_SECONDS, ClientOptions, SentinelClients, connect
from sidecar.store.url import parse_redis_url
from tests.functional.helpers import eventually
from tests.functional.topology_helpers import Traffic
from tests.topologies import SentinelTopology

# Short socket timeouts: on loopback a dead primary refuses at once; retries cover the rest.
OPTIONS = ClientOptions(max_connections=4, timeout=1.0, connect_timeout=0.5)


@pytest.fixture
async def clients(failover_sentinel: SentinelTopology) -> AsyncIterator[SentinelClients]:
    built = connect(parse_redis_url(failover_sentinel.url), OPTIONS)
    assert isinstance(built, SentinelClients)
    yield built
    await built.aclose()


async def switch_announced(clients: SentinelClients) -> float:
    """When the watch saw the first +switch-master (polled: a counter has no event)."""
    while not clients.switches:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return time.monotonic()


async def on_node(node_port: int, ns: list[int]) -> set[int]:
    """Which of the writes ``ns`` the node at ``node_port`` holds (asked directly)."""
    with redis.Redis(port=node_port) as c:
        entries: Any = c.xrange("s")
    have = {int(e[0].split(b"-")[0]) for e in entries}
    return have & set(ns)


class CancelSubscriber:
    """A subscriber that resubscribes after any error, as the sidecar's cancel listener does."""

    def __init__(self, clients: SentinelClients, channel: str) -> None:
        self.clients = clients
        self.channel = channel
        self.got: list[bytes] = []
        self.subscribed = asyncio.Event()
        self.errors = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            pubsub = self.clients.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        self.got.append(message["data"])
            except (redis.RedisError, OSError):
                self.errors += 1
                self.subscribed.clear()
                await asyncio.sleep(0.05)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_sentinel_failover_is_followed_by_every_connection_once_announced(
    failover_sentinel: SentinelTopology,
    clients: SentinelClients,
    capsys: pytest.CaptureFixture[str],
) -> None:
    watch = asyncio.create_task(clients.watch_failovers())
    blocker = clients.dedicated(socket_timeout=None)
    cancels = CancelSubscriber(clients, "sse:run:cancel")
    traffic = Traffic(clients.general, blocker)
    try:
        await cancels.subscribed.wait()
        traffic.start()

        async def flowing() -> bool:
            return len(traffic.read) >= 20

        await eventually(flowing, what="traffic flowing")
        announced = asyncio.create_task(switch_announced(clients))
        old = failover_sentinel.primary()
        new, agreed_after = await asyncio.to_thread(failover_sentinel.failover)
        switched_at = await asyncio.wait_for(announced, 10)
        await asyncio.sleep(1.5)
        # The cancel channel: a publish after the failover reaches the resubscribed listener.
        await cancels.subscribed.wait()
        assert await clients.general.publish("sse:run:cancel", "run-1") == 1

        async def cancelled() -> bool:
            return cancels.got == [b"run-1"]

        await eventually(cancelled, what="the cancel message")
        await traffic.stop()
        blocker_port = blocker.connection.port if blocker.connection else None
    finally:
        watch.cancel()
        await cancels.close()
        await blocker.aclose()
    after = traffic.acked_after(switched_at + 0.05)
    assert after, "writes went on after the switch"
    # Every write acknowledged after the announcement is on the new primary, none lost.
    assert await on_node(new.port, after) == set(after)
    # The dedicated connection and the pool moved to the new primary (the old one is still up,
    # still a primary: connections left there would read and write there).
    assert blocker_port == new.port
    assert old.role() == "master"  # not converted yet: that is what makes the watch necessary
    # The blocked reader saw every acknowledged write, in order, once.
    assert [n for _, n in traffic.read] == [n for _, n in traffic.acked]
    assert not traffic.errors, traffic.errors
    before = [n for t, n in traffic.acked if t <= switched_at]
    lost = sorted(set(before) - await on_node(new.port, before))
    with capsys.disabled():
        print(
            f"\n[sentinel failover] sentinels agreed after {agreed_after:.2f}s; longest write "
            f"pause {traffic.longest_write_pause():.3f}s; acknowledged then lost (written to "
            f"the old primary between promotion and announcement): {len(lost)} of "
            f"{len(traffic.acked)}; errors surfaced: {traffic.errors or 'none'}"
        )


async def test_writes_held_while_a_failover_is_announced_are_never_lost(
    failover_sentinel: SentinelTopology,
    clients: SentinelClients,
    capsys: pytest.CaptureFixture[str],
) -> None:
    watch = asyncio.create_task(clients.watch_failovers())
    blocker = clients.dedicated(socket_timeout=None)
    traffic = Traffic(clients.general, blocker, gate=clients.wait_writable)
    try:
        traffic.start()

        async def flowing() -> bool:
            return len(traffic.read) >= 20

        await eventually(flowing, what="traffic flowing")
        new, _ = await asyncio.to_thread(failover_sentinel.failover)

        async def switched() -> bool:
            return clients.switches > 0

        await eventually(switched, what="the +switch-master announcement")
        await asyncio.sleep(0.5)
        await traffic.stop()
    finally:
        watch.cancel()
        await blocker.aclose()
    acked = [n for _, n in traffic.acked]
    assert clients.pauses == 1
    # Every acknowledged write is on the new primary: none went to the old one after its
    # replica stopped replicating.
    assert await on_node(new.port, acked) == set(acked)
    assert [n for _, n in traffic.read][-5:] == acked[-5:]
    assert traffic.longest_write_pause() < WRITE_PAUSE_SECONDS
    with capsys.disabled():
        print(
            f"\n[sentinel failover, writes held] longest write pause "
            f"{traffic.longest_write_pause():.2f}s; acknowledged then lost: 0 of {len(acked)}"
        )


async def test_without_the_watch_writes_go_on_to_the_old_primary_and_are_lost(
    failover_sentinel: SentinelTopology, clients: SentinelClients
) -> None:
    """Why the +switch-master watch exists: redis-py alone re-asks the sentinels only when a
    connection fails, and the old primary keeps taking writes until it is converted."""
    blocker = clients.dedicated(socket_timeout=None)
    traffic = Traffic(clients.general, blocker)
    try:
        traffic.start()
        await asyncio.sleep(0.3)
        old = failover_sentinel.primary()
        new, _ = await asyncio.to_thread(failover_sentinel.failover)
        agreed_at = time.monotonic()
        await asyncio.sleep(1.0)
        await traffic.stop()
        blocker_port = blocker.connection.port if blocker.connection else None
    finally:
        await blocker.aclose()
    after = traffic.acked_after(agreed_at)
    assert after
    # All acknowledged by the old primary, none on the new one: lost once it is converted.
    assert await on_node(old.port, after) == set(after)
    assert await on_node(new.port, after) == set()
    assert blocker_port == old.port


async def test_writes_confirmed_by_wait_are_never_lost_in_a_sentinel_failover(
    failover_sentinel: SentinelTopology, clients: SentinelClients
) -> None:
    watch = asyncio.create_task(clients.watch_failovers())
    blocker = clients.dedicated(socket_timeout=None)
    traffic = Traffic(clients.general, blocker, wait_replica=True)
    try:
        traffic.start()
        await asyncio.sleep(0.5)
        new, _ = await asyncio.to_thread(failover_sentinel.failover)
        await asyncio.sleep(1.0)
        await traffic.stop()
    finally:
        watch.cancel()
        await blocker.aclose()
    acked = [n for _, n in traffic.acked]
    assert acked
    assert await on_node(new.port, acked) == set(acked)
    # With one replica, the new primary has none until the old one is converted: WAIT keeps
    # saying 0 and the writer holds its writes (they are retried, not lost).
    assert traffic.unconfirmed > 0


async def test_clients_follow_a_sigkilled_primary(
    failover_sentinel: SentinelTopology,
    clients: SentinelClients,
    capsys: pytest.CaptureFixture[str],
) -> None:
    watch = asyncio.create_task(clients.watch_failovers())
    blocker = clients.dedicated(socket_timeout=None)
    traffic = Traffic(clients.general, blocker)
    try:
        traffic.start()
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        _, new, agreed_after = await asyncio.to_thread(failover_sentinel.kill_primary)
        await asyncio.sleep(1.5)
        await traffic.stop()
        blocker_port = blocker.connection.port if blocker.connection else None
    finally:
        watch.cancel()
        await blocker.aclose()
    after = traffic.acked_after(killed_at)
    assert after
    assert await on_node(new.port, after) == set(after)
    assert blocker_port == new.port
    assert [n for _, n in traffic.read][-len(after) :] == after
    # Only connection errors reach the caller (MasterNotFoundError is one), never others.
    assert all(name.endswith(("ConnectionError", "MasterNotFoundError")) for name in traffic.errors)
    with capsys.disabled():
        print(
            f"\n[sentinel SIGKILL] sentinels agreed after {agreed_after:.2f}s; writes paused "
            f"{traffic.longest_write_pause():.2f}s; errors that outlasted redis-py's "
            f"{OPTIONS.retries} retries: {traffic.errors or 'none'}"
        )


@pytest.mark.slow
async def test_a_restarted_old_primary_rejoins_as_a_replica_and_is_never_written(
    failover_sentinel: SentinelTopology, clients: SentinelClients
) -> None:
    watch = asyncio.create_task(clients.watch_failovers())
    try:
        await clients.general.xadd("s", {"n": 1}, id="1-0")
        old, new, _ = await asyncio.to_thread(failover_sentinel.kill_primary)
        await clients.general.xadd("s", {"n": 2}, id="2-0")
        # It comes back empty and a primary, until the sentinels turn it into a replica.
        await asyncio.to_thread(failover_sentinel.restart, old)
        await clients.general.xadd("s", {"n": 3}, id="3-0")
        assert await on_node(new.port, [1, 2, 3]) == {1, 2, 3}
        await asyncio.to_thread(failover_sentinel.wait_healthy)
        assert await on_node(old.port, [1, 2, 3]) == {1, 2, 3}  # resynced from the new one
    finally:
        watch.cancel()


async def test_the_general_client_is_bounded(sentinel_set: SentinelTopology) -> None:
    built = connect(parse_redis_url(sentinel_set.url), ClientOptions(max_connections=2))
    try:
        primary = sentinel_set.primary()
        # Ten commands that each hold a connection for 0.3 s share two connections.
        await asyncio.gather(
            *(built.general.xread({f"idle-{i}": "$"}, block=300) for i in range(10))
        )
        with redis.Redis(port=primary.port) as c:
            clients_list: Any = c.client_list()
        ours = [c for c in clients_list if c.get("cmd") in ("xread",)]
        assert len(ours) <= 2
    finally:
        await built.aclose()


@pytest.mark.slow
async def test_without_the_watch_a_blocked_reader_leaves_the_old_primary_when_it_is_converted(
    failover_sentinel: SentinelTopology, clients: SentinelClients
) -> None:
    """When the sentinels convert the old primary they kill its clients (CLIENT KILL TYPE
    normal): the blocked XREAD fails, and its retry reconnects through the sentinels (not to the
    address it had: redis-py #3874), so it ends on the new primary, not on the replica."""
    blocker = clients.dedicated(socket_timeout=None)
    try:
        await blocker.ping()
        old = failover_sentinel.primary()

        async def read() -> Any:
            return await blocker.xread({"s": "$"}, block=0)

        reading = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        new, _ = await asyncio.to_thread(failover_sentinel.failover)
        await asyncio.to_thread(failover_sentinel.wait_healthy)  # the old primary converted
        await clients.general.xadd("s", {"n": 1}, id="1-0")
        reply: Any = await asyncio.wait_for(reading, 10)
        assert reply[0][1][0][0] == b"1-0"
        assert blocker.connection is not None
        assert blocker.connection.port == new.port
        assert old.role() == "slave"
    finally:
        await blocker.aclose()
