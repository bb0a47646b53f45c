"""A sidecar stopped (SIGTERM: drain) or killed (SIGKILL) while it produces runs, with a second
replica beside it.

SIGTERM: runs that end within ``drain_seconds`` end naturally, the rest get the
``sidecar_shutdown`` terminal, the writer flushes, the process exits 0; nobody writes
``producer_lost`` later. SIGKILL: the other replica's orphan sweep ends each run exactly once as
``producer_lost``, about a lease later, without any reader asking (DESIGN.md "When things fail",
the terminal table).
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, RedisFactory
from tests.faults.harness import (
    Readers,
    SidecarFactory,
    Traffic,
    audit,
    bounded_rss,
    check_terminal,
    check_whole,
    forced_reasons,
    in_redis,
    labels,
    record,
    replay,
    stored,
    totals,
)
from tests.functional.helpers import eventually

P = "sse_sidecar_"
SHUTDOWN = ["stop:error", "error:sidecar_shutdown", "[DONE]"]
LOST = ["stop:error", "error:producer_lost", "[DONE]"]


@pytest.mark.timeout(120)
async def test_sigterm_drains_with_a_second_replica(
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    lease, drain = 3.0, 2.0
    flags = {"lease_seconds": lease, "heartbeat_seconds": 1}
    a, b = await asyncio.gather(
        sidecars("a", redis.url, drain_seconds=drain, **flags), sidecars("b", redis.url, **flags)
    )
    short = traffic.start(a, 10, prefix="short", interval=0.05, min_events=10**9)
    endless = traffic.start(a, 10, prefix="endless", interval=0.05, min_events=10**9)
    runs = short + endless
    await traffic.received(runs, 10)
    await in_redis(client, runs)
    async with Readers(b, [r.run_id for r in runs]) as readers:
        await readers.reading()
        a.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        for run in short:  # these end well within the drain
            run.max_events = len(run.sent) + 10
        code = await a.exited(timeout=drain + 15)
        exit_s = time.monotonic() - stopped_at
        await traffic.ended(runs, timeout=10)
        await readers.finished(timeout=10)
    # A lease and more later, the other replica's sweep has had every chance to strike.
    await asyncio.sleep(2 * lease)  # waiting for something not to happen: no event to await
    scrape = await b.settled(http)
    audits = await audit(runs, client, http, b)

    assert code == 0, a.output()[-2000:]
    for x in audits:
        if x.run in short:
            check_whole(x)
        else:
            check_whole(x, status="failed", forced="sidecar_shutdown", synthesized=SHUTDOWN)
        assert readers.events(x.run.run_id) == x.live
        assert readers.ends[x.run.run_id] == "eof"
    assert forced_reasons(audits) == {"natural": 10, "sidecar_shutdown": 10}
    assert scrape.by(P + "forced_done_total", "reason") == {}
    assert "draining 20 running streams" in a.output()
    record(
        "sidecar_sigterm_drain_second_replica",
        **totals(audits),
        forced=forced_reasons(audits),
        exit_code=code,
        reader_start_503=readers.start_503,
        exit_s=round(exit_s, 1),
        drain_s=drain,
        peak_rss_mb=bounded_rss(a, b),
    )


@pytest.mark.parametrize(
    ("lease", "runs"),
    [
        pytest.param(3.0, 20, id="lease3s"),
        pytest.param(30.0, 80, id="lease30s", marks=pytest.mark.long),
    ],
)
@pytest.mark.timeout(300)
async def test_sigkill_with_a_second_replica(
    lease: float,
    runs: int,
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    flags = {"lease_seconds": lease}
    a, b = await asyncio.gather(
        sidecars("a", redis.url, **flags), sidecars("b", redis.url, **flags)
    )
    done = traffic.start(a, 3, prefix="done", max_events=5)
    await traffic.ended(done, timeout=30)
    live = traffic.start(a, runs, interval=0.05, min_events=10**9)
    await traffic.received(live, 10)
    await a.settled(http, runs_too=False)
    a.signal(signal.SIGKILL)
    assert await a.exited(timeout=10) == -signal.SIGKILL
    killed = time.monotonic()
    await traffic.ended(live, timeout=10)
    ended_after: dict[str, float] = {}

    async def all_ended() -> bool:
        for run in live:
            if run.run_id not in ended_after:
                meta = (await stored(client, run.run_id)).meta
                if meta["status"] != "running":
                    ended_after[run.run_id] = time.monotonic() - killed
        return len(ended_after) == runs

    # Nobody reads these runs: only the sweep can end them.
    await eventually(all_ended, timeout=3 * lease + 10, interval=0.05, what="the sweep")
    scrape = await b.settled(http)
    audits = await audit(live, client, http, b)

    for x in audits:
        assert x.run.client_end.startswith("cut")  # its connection died with A
        check_terminal(x.stored.entries, f"{x.run.key} stored")
        said = labels(x.stored.entries)
        assert said[-3:] == LOST
        assert said.count("error:producer_lost") == 1
        last = max(x.stored.entries) - 3
        # Everything A had stored before it died is there, byte for byte as its client got it.
        assert {s: x.stored.entries[s] for s in range(1, last + 1)} == {
            s: x.live[s] for s in range(1, last + 1)
        }
        meta = x.stored.meta
        assert (meta["status"], meta["forced_done"], meta["stop_reason"]) == (
            "failed",
            "producer_lost",
            "error",
        )
        assert x.replayed.events == x.stored.entries
        assert not x.replayed.losses
    for x in await audit(done, client, http, b):
        assert x.stored.meta["forced_done"] == ""  # finished runs are left alone
    assert scrape.by(P + "forced_done_total", "reason") == {"producer_lost": runs}
    assert b.output().count("forced producer_lost") == runs
    # About a lease after the kill (the lease, plus up to a sweep pass of a third of it).
    assert min(ended_after.values()) >= lease - 1.0
    assert (await replay(http, b, live[0].run_id)).answers == [200]
    record(
        f"sidecar_sigkill_second_replica_lease_{int(lease)}s",
        **totals(audits),
        forced=forced_reasons(audits),
        producer_lost_after_s=[
            round(min(ended_after.values()), 2),
            round(max(ended_after.values()), 2),
        ],
        peak_rss_mb=bounded_rss(a, b),
    )
