"""Redis loses its data (FLUSHALL: as a restart without persistence, or a failover to an empty
replica) while some runs stream and others are quiet, with replay readers on both replicas.

DESIGN.md "When things fail": the loss is counted (``redis_data_lost_total``,
``writer_dropped_events_total{reason="history_lost"}``), logged once per run, recorded in the
rebuilt meta (``history_lost_through``) and answered by replay as ``history_lost``; a reader of a
run whose history vanished gets an error event or a cut, never a clean end without ``[DONE]``;
status answers again within a probe interval (issue 10, failure 2: readers of quiet runs got a
clean end, and status/replay answered 404 for about 10 s).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, RedisFactory
from tests.faults.harness import (
    Readers,
    SidecarFactory,
    SidecarProcess,
    Traffic,
    audit,
    bounded_rss,
    check_marked,
    forced_reasons,
    in_redis,
    label,
    record,
    replay,
    split_raw,
    totals,
)

P = "sse_sidecar_"
PROBE = 1.0


async def status_of(http: aiohttp.ClientSession, sc: SidecarProcess, run_id: str) -> int:
    async with http.get(sc.run_url(run_id)) as resp:
        if resp.status != 200:
            return resp.status
        body = await resp.json()
        assert body["status"] == "running", body
        # The rebuilt meta, not the producer's "just started" placeholder.
        return 200 if body["history_lost_through"] else 299


@pytest.mark.timeout(300)
async def test_flushall_while_runs_are_live_and_quiet(
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    flags = {"redis_probe_seconds": PROBE, "heartbeat_seconds": 1}
    a, b = await asyncio.gather(
        sidecars("a", redis.url, **flags), sidecars("b", redis.url, **flags)
    )
    finished = traffic.start(a, 3, prefix="finished", max_events=5)
    await traffic.ended(finished, timeout=30)
    live = traffic.start(a, 10, prefix="live", interval=0.05, min_events=10**9)
    quiet = traffic.start(a, 10, prefix="quiet", interval=0.01, quiet_after=5)
    runs = live + quiet
    await traffic.received(live, 10)
    await traffic.received(quiet, 5, more=False)
    await a.settled(http, runs_too=False)
    ids = [r.run_id for r in runs]
    await in_redis(client, runs)
    async with Readers(a, ids) as on_a, Readers(b, ids) as on_b:
        await on_a.reading()
        await on_b.reading()
        flushed = time.monotonic()
        assert await client.flushall()
        # Status answers again, from the rebuilt meta, on the producer and the other replica.
        answered: dict[str, float] = {}
        deadline = flushed + 10 * PROBE
        while len(answered) < 2 * len(quiet) and time.monotonic() < deadline:
            for sc in (a, b):
                for run in quiet:
                    key = f"{sc.name}:{run.run_id}"
                    if key not in answered and await status_of(http, sc, run.run_id) == 200:
                        answered[key] = time.monotonic() - flushed
            await asyncio.sleep(0.02)  # another process's state: nothing to await
        for run in quiet:
            run.hold.set()
        await traffic.received(live, 20)
        for run in live:
            run.max_events = len(run.sent)
        traffic.finish()
        await traffic.ended(runs, timeout=60)
        await on_a.finished(timeout=30)
        await on_b.finished(timeout=30)
    scrapes = {sc.name: await sc.settled(http) for sc in (a, b)}
    audits = await audit(runs, client, http, b)

    assert len(answered) == 2 * len(quiet), f"status answered for {sorted(answered)}"
    assert max(answered.values()) <= PROBE + 1.0, answered
    lost = 0
    for x in audits:
        missing = check_marked(x, kinds={"history_lost"})
        through = int(x.stored.meta["history_lost_through"])
        assert missing == set(range(1, through + 1))
        assert through >= (10 if x.run in live else 5)
        lost += through
        for readers in (on_a, on_b):
            outcome = reader_outcome(readers, x.run.run_id, x.live)
            assert outcome in ("whole", "told"), f"{x.run.key}: {outcome}"
    for run in finished:
        assert (await replay(http, b, run.run_id)).answers == [404]
    assert scrapes["a"].by(P + "writer_dropped_events_total", "reason") == {"history_lost": lost}
    for sc in (a, b):
        assert scrapes[sc.name].value(P + "redis_data_lost_total") == 1
        assert sc.output().count("Redis lost its data") == 1
    assert a.output().count("Redis lost its stored events") == len(runs)  # once per run
    assert forced_reasons(audits) == {"natural": len(runs)}
    outcomes = [reader_outcome(r, x.run.run_id, x.live) for r in (on_a, on_b) for x in audits]
    record(
        "redis_flushall_live_and_quiet",
        **totals(audits),
        dropped=scrapes["a"].by(P + "writer_dropped_events_total", "reason"),
        redis_data_lost=[scrapes[sc.name].value(P + "redis_data_lost_total") for sc in (a, b)],
        readers_whole=outcomes.count("whole"),
        readers_told=outcomes.count("told"),
        reader_start_503=on_a.start_503 + on_b.start_503,
        status_again_after_s=round(max(answered.values()), 2),
        probe_s=PROBE,
        forced=forced_reasons(audits),
        peak_rss_mb=bounded_rss(a, b),
    )


def reader_outcome(readers: Readers, run_id: str, live: dict[int, bytes]) -> str:
    """``whole``: the reader got every event to [DONE] (it had all that Redis lost before it
    was lost); ``told``: every event it got was right, then an error event naming the loss and
    a cut. Anything else (a clean end without [DONE], a wrong event) is a failure."""
    events = split_raw(readers.bodies[run_id])
    end = readers.ends[run_id]
    numbered = [e for e in events if b"\nid: " in b"\n" + e]
    if [e for e in events if e not in numbered]:
        notice = events[-1]
        told = label(notice) == "error:history_lost" and end.startswith("cut")
        prefix = numbered == [live[s] for s in range(1, len(numbered) + 1)]
        return "told" if told and prefix and len(events) == len(numbered) + 1 else f"bad: {end}"
    whole = numbered == [live[s] for s in sorted(live)] and end == "eof"
    return "whole" if whole else f"bad: {end}, {len(numbered)} events"
