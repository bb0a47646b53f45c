"""Redis SIGKILLed mid-stream and restarted: with AOF (fsync always) nothing acknowledged is
lost; without persistence Redis comes back empty, and that loss is marked in each run's meta,
counted, logged, and answered by replay as ``history_lost`` (DESIGN.md "When things fail")."""

from __future__ import annotations

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, RedisFactory
from tests.faults.harness import (
    SidecarFactory,
    Traffic,
    audit,
    bounded_rss,
    check_marked,
    check_whole,
    forced_reasons,
    record,
    replay,
    totals,
)

RUNS = 20
P = "sse_sidecar_"


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no_persistence"])
async def test_redis_sigkill_and_restart(
    aof: bool,
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=aof)
    client = direct(redis)
    a = await sidecars("a", redis.url, redis_probe_seconds=0.5)
    # Runs that ended before the fault, then runs streaming through it.
    before = traffic.start(a, 4, prefix="before", max_events=5)
    await traffic.ended(before, timeout=30)
    await a.settled(http)
    live = traffic.start(a, RUNS, interval=0.05, min_events=60)
    await traffic.received(live, 10)
    redis.kill()
    # Redis is gone; the live clients keep streaming.
    await traffic.received(live, 20)
    redis.start()
    await traffic.received(live, 10)
    traffic.finish()
    await traffic.ended(live, timeout=60)
    scrape = await a.settled(http)
    audits = await audit(live, client, http, a)
    dropped = scrape.by(P + "writer_dropped_events_total", "reason")
    if aof:
        for x in await audit(before, client, http, a):
            check_whole(x)
        for x in audits:
            check_whole(x)
        assert dropped == {}
        assert scrape.value(P + "redis_data_lost_total") == 0
        lost = 0
    else:
        lost_seqs = [check_marked(x, kinds={"history_lost"}) for x in audits]
        # Each run lost exactly what Redis had confirmed before it died: a prefix.
        for x, seqs in zip(audits, lost_seqs, strict=True):
            assert seqs == set(range(1, int(x.stored.meta["history_lost_through"]) + 1))
            assert x.stored.meta["incomplete"] == "history_lost"
            assert x.replayed.losses[0]["error_type"] == "history_lost"
        lost = sum(len(s) for s in lost_seqs)
        assert lost > 0
        assert dropped == {"history_lost": lost}
        assert scrape.value(P + "redis_data_lost_total") == 1
        # The finished runs are gone with Redis' data: a reader is told so, not left waiting.
        for run in before:
            assert (await replay(http, a, run.run_id)).answers == [404]
        assert a.output().count("Redis lost its data") == 1
    assert forced_reasons(audits) == {"natural": RUNS}

    record(
        f"redis_sigkill_restart_{'aof' if aof else 'no_persistence'}",
        **totals(audits),
        lost_marked=lost,
        forced=forced_reasons(audits),
        dropped=dropped,
        redis_data_lost=scrape.value(P + "redis_data_lost_total"),
        peak_rss_mb=bounded_rss(a),
    )
