"""Redis out of reach for longer than the producer lease while runs stream, replay readers
follow them on another replica and status calls hammer both replicas: Redis frozen (SIGSTOP,
then SIGCONT), or the network in between black-holed and then reset (every connection RST).

DESIGN.md "When things fail": a process never declares a run it is producing lost, and a lease
that lapsed while Redis was out of reach for everybody says nothing about its producer; so every
run ends whole, naturally, and nobody writes ``producer_lost`` (issue 10, failure 1: 98/100
healthy runs ended as producer_lost, finalized by their own producer, then fenced).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, ForwarderFactory, RedisFactory
from tests.faults.harness import (
    Poller,
    Readers,
    SidecarFactory,
    SidecarProcess,
    Traffic,
    audit,
    bounded_rss,
    check_whole,
    forced_reasons,
    in_redis,
    record,
    totals,
)

P = "sse_sidecar_"
LONG = pytest.mark.long


@pytest.mark.parametrize(
    ("fault", "lease", "outage", "runs", "interval"),
    [
        pytest.param("sigstop", 3.0, 5.0, 20, 0.05, id="sigstop-5s-lease3s"),
        pytest.param("blackhole", 3.0, 5.0, 20, 0.05, id="blackhole-5s-reset-lease3s"),
        pytest.param("sigstop", 30.0, 30.0, 100, 0.1, id="sigstop-30s-lease30s", marks=LONG),
        pytest.param("sigstop", 30.0, 60.0, 100, 0.1, id="sigstop-60s-lease30s", marks=LONG),
        pytest.param("blackhole", 30.0, 60.0, 100, 0.1, id="blackhole-60s-lease30s", marks=LONG),
    ],
)
@pytest.mark.timeout(600)
async def test_redis_out_of_reach_over_the_lease(
    fault: str,
    lease: float,
    outage: float,
    runs: int,
    interval: float,
    make_redis: RedisFactory,
    direct: DirectFactory,
    forwarder: ForwarderFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    # Each replica reaches Redis through its own link, so that the producer's can heal last.
    net_a, net_b = await forwarder(redis), await forwarder(redis)
    flags = {"lease_seconds": lease, "heartbeat_seconds": 1}
    a, b = await asyncio.gather(
        sidecars("a", net_a.url, **flags), sidecars("b", net_b.url, **flags)
    )
    # Each run streams through the outage and for two leases after it (when a sweep would
    # strike), counted in events so that a slow machine stretches the run, not the verdict.
    after = int(2 * lease / interval)
    live = traffic.start(a, runs, interval=interval, min_events=10**9)
    await traffic.received(live, 5)
    run_ids = [r.run_id for r in live]
    await in_redis(client, live)
    async with Readers(b, run_ids) as readers, Poller(http, a, run_ids) as on_a:
        async with Poller(http, b, run_ids) as on_b:
            await readers.reading()
            if fault == "sigstop":
                redis.pause()
            else:
                await net_a.blackhole()
                await net_b.blackhole()
            began = time.monotonic()
            await asyncio.sleep(outage)  # the outage's length is the case: nothing to await
            if fault == "sigstop":
                redis.resume()
            else:
                # What was held is lost with the connections, as in a failover. The producer
                # gets through half a lease after the other replica (as when its writer was in
                # a retry backoff): every lease in Redis has expired by then, and the other
                # replica's sweep must not take that for a dead producer.
                await net_b.reset()
                await net_b.pass_()
                early = await asyncio.gather(*(replay_head(http, b, r) for r in run_ids[:10]))
                await asyncio.sleep(lease / 2)
                await net_a.reset()
                await net_a.pass_()
            healed = time.monotonic()
            if fault == "sigstop":
                # Replays from 0 right after, while every lease in Redis has expired.
                early = await asyncio.gather(*(replay_head(http, b, r) for r in run_ids[:10]))
            await traffic.received(live, after, timeout=after * interval * 10 + 60)
            for run in live:
                run.max_events = len(run.sent)  # finish now
            traffic.finish()
            await traffic.ended(live, timeout=60)
        await readers.finished(timeout=30)
    scrapes = [await sc.settled(http) for sc in (a, b)]
    audits = await audit(live, client, http, b)

    for x in audits:
        check_whole(x)
        assert readers.ends[x.run.run_id] == "eof"
        assert readers.events(x.run.run_id) == x.live
    assert early == [(200, "")] * len(early)
    assert forced_reasons(audits) == {"natural": runs}
    for scrape in scrapes:
        assert scrape.by(P + "writer_dropped_events_total", "reason") == {}
        assert scrape.by(P + "forced_done_total", "reason") == {}
    assert "producer_lost" not in a.output() + b.output()
    answers = on_a.answers + on_b.answers
    # Status calls: never a run declared lost; every call sent once Redis was back answered.
    assert {forced for _, _, forced in answers} == {"None"}
    late = [status for t, status, _ in answers if t > healed]
    assert late
    assert set(late) == {200}
    record(
        f"redis_{fault}_{int(outage)}s_lease_{int(lease)}s",
        **totals(audits),
        outage_s=round(healed - began, 1),
        forced=forced_reasons(audits),
        readers_whole=sum(readers.ends[r] == "eof" for r in run_ids),
        reader_start_503=readers.start_503,
        status_calls=len(answers),
        status_unavailable=sum(s != 200 for _, s, _ in answers),
        peak_rss_mb=bounded_rss(a, b),
    )


async def replay_head(
    http: aiohttp.ClientSession, sc: SidecarProcess, run_id: str
) -> tuple[int, str]:
    """The status of a replay from 0 (its first bytes read, then closed), and the error."""
    async with http.get(sc.run_url(run_id, "/stream")) as resp:
        if resp.status == 200:
            await resp.content.readany()
            return resp.status, ""
        return resp.status, await resp.text()
