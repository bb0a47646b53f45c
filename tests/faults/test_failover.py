"""A failover to a replica that lags: the primary acknowledged writes the replica never got
(asynchronous replication: what Sentinel or a managed Redis does when a primary dies; here the
replication link stalls, then the primary is killed and the replica promoted), so Redis
comes back holding each run only up to some earlier seq, with its meta and its epoch intact.

DESIGN.md "When things fail": a 60 s outage (a failover) ends with every live run whole, or
its loss marked; Redis losing acknowledged events is counted, recorded in the meta and answered
by replay as ``history_lost``; ``producer_lost`` is only for producers that really died.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio

from tests.faults.conftest import DirectFactory, ForwarderFactory, RedisFactory
from tests.faults.harness import (
    SidecarFactory,
    Traffic,
    audit,
    bounded_rss,
    check_marked,
    forced_reasons,
    record,
    totals,
)
from tests.functional.helpers import eventually

P = "sse_sidecar_"


async def in_sync(primary: redis.asyncio.Redis, replica: redis.asyncio.Redis) -> None:
    async def caught_up() -> bool:
        ours: dict[str, object] = await primary.info("replication")
        theirs: dict[str, object] = await replica.info("replication")
        return theirs.get("master_link_status") == "up" and theirs.get(
            "slave_repl_offset"
        ) == ours.get("master_repl_offset")

    # Replication progress has no event a client can await.
    await eventually(caught_up, timeout=20, interval=0.05, what="the replica in sync")


@pytest.mark.timeout(180)
async def test_failover_to_a_lagging_replica(
    make_redis: RedisFactory,
    direct: DirectFactory,
    forwarder: ForwarderFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    primary, replica = make_redis(aof=False), make_redis(aof=False)
    to_primary, to_replica = direct(primary), direct(replica)
    # Replication goes through a link of its own, so that it can stall for sure (a replica
    # process merely stopped would still find the primary's stream in its socket buffer).
    replication = await forwarder(primary)
    await to_replica.replicaof("127.0.0.1", replication.port)
    net = await forwarder(primary)
    flags = {"lease_seconds": 3, "redis_probe_seconds": 0.5}
    a, b = await asyncio.gather(sidecars("a", net.url, **flags), sidecars("b", net.url, **flags))
    live = traffic.start(a, 10, interval=0.05, min_events=10**9)
    await traffic.received(live, 10)
    await a.settled(http, runs_too=False)
    await in_sync(to_primary, to_replica)
    await replication.blackhole()  # from here on the replica lags
    await traffic.received(live, 20)
    await a.settled(http, runs_too=False)  # acknowledged by the primary, never replicated
    primary.kill()
    await replication.reset()
    assert await to_replica.replicaof("NO", "ONE")
    await net.retarget(replica.port)
    await net.reset()
    await traffic.received(live, 40)
    for run in live:
        run.max_events = len(run.sent)
    traffic.finish()
    await traffic.ended(live, timeout=60)
    # Two leases later: any sweep that was going to strike has.
    await asyncio.sleep(6)  # waiting for something not to happen: no event to await
    scrapes = [await sc.settled(http) for sc in (a, b)]
    audits = await audit(live, to_replica, http, b)

    lost = 0
    for x in audits:
        missing = check_marked(x, kinds={"history_lost"})
        assert missing, f"{x.run.key}: the replica lagged, yet nothing is missing"
        lost += len(missing)
    assert forced_reasons(audits) == {"natural": len(live)}
    assert scrapes[0].by(P + "writer_dropped_events_total", "reason") == {"history_lost": lost}
    for scrape in scrapes:
        assert scrape.by(P + "forced_done_total", "reason") == {}
    record(
        "redis_failover_to_a_lagging_replica",
        **totals(audits),
        dropped=scrapes[0].by(P + "writer_dropped_events_total", "reason"),
        forced=forced_reasons(audits),
        peak_rss_mb=bounded_rss(a, b),
    )
