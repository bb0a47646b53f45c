"""Redis down (or slow) for longer than the writer's bound can hold (``writer_max_bytes``): the
live clients stream on, what does not fit is dropped and counted, and once Redis is back each run is
stored again after a hole its meta records; replays name each hole (``events_lost``) and go on
after it (DESIGN.md "When things fail"; issue 10, failure 3: once a run overflowed nothing more
of it was ever stored, 18 % kept)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, ForwarderFactory, RedisFactory
from tests.faults.harness import (
    Audit,
    Readers,
    SidecarFactory,
    Traffic,
    audit,
    bounded_rss,
    check_marked,
    forced_reasons,
    in_redis,
    label,
    marked_losses,
    record,
    split_raw,
    totals,
)

P = "sse_sidecar_"


@pytest.mark.parametrize(
    ("down", "bound", "runs", "interval"),
    [
        pytest.param(6.0, 256 << 10, 20, 0.05, id="down-6s-256KiB"),
        pytest.param(45.0, 4 << 20, 100, 0.1, id="down-45s-4MiB", marks=pytest.mark.long),
    ],
)
@pytest.mark.timeout(600)
async def test_redis_down_past_the_writer_bound(
    down: float,
    bound: int,
    runs: int,
    interval: float,
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    flags = {"heartbeat_seconds": 1, "ready_without_redis": "true"}
    a, b = await asyncio.gather(
        sidecars("a", redis.url, writer_max_bytes=bound, **flags),
        sidecars("b", redis.url, **flags),
    )
    live = traffic.start(a, runs, interval=interval, min_events=10**9)
    await traffic.received(live, 5)
    await in_redis(client, live)
    async with Readers(b, [r.run_id for r in live]) as readers:
        await readers.reading()
        redis.kill()
        await asyncio.sleep(down)  # the outage's length is the case: nothing to await
        over = (await a.scrape(http)).value(P + "writer_dropped_events_total", reason="overflow")
        redis.start()
        # Streams go on long enough after Redis is back for every run to be stored again.
        await traffic.received(live, int(5 / interval))
        for run in live:
            run.max_events = len(run.sent)
        traffic.finish()
        await traffic.ended(live, timeout=60)
        await readers.finished(timeout=30)
    scrape = await a.settled(http)
    audits = await audit(live, client, http, b)

    lost_total = 0
    for x in audits:
        missing = check_marked(x, kinds={"events_lost"})
        assert missing, f"{x.run.key}: nothing dropped (the case did not overflow)"
        lost_total += len(missing)
        # Stored again: events after the last hole, before the terminal, are in Redis.
        after = stored_after_holes(x)
        assert len(after) > 1, f"{x.run.key}: only {after} stored after the hole"
        assert {loss["error_type"] for loss in x.replayed.losses} == {"events_lost"}
        # The live follower on the other replica: every event up to the first hole, then an
        # error event naming it, then a cut; never a clean end without the terminal.
        followed = readers.bodies[x.run.run_id]
        events = split_raw(followed)
        first_hole = min(missing)
        assert events[: first_hole - 1] == [x.live[s] for s in range(1, first_hole)]
        notice = events[first_hole - 1]
        assert label(notice) == "error:events_lost", notice
        assert len(events) == first_hole, f"{x.run.key}: the reader went on past the hole"
        assert readers.ends[x.run.run_id].startswith("cut"), readers.ends[x.run.run_id]
    dropped = scrape.by(P + "writer_dropped_events_total", "reason")
    assert dropped == {"overflow": lost_total}
    assert over > 0  # counted while it happened, not at the end
    assert forced_reasons(audits) == {"natural": runs}
    # Bounded memory: the buffered events never exceed the bound (plus one terminal per run).
    peak = bounded_rss(a, b, mib=120 + 4 * bound / (1 << 20))
    assert a.output().count("dropping its events from seq") == runs  # logged once per run
    record(
        f"redis_down_{int(down)}s_writer_bound_{bound >> 10}KiB",
        **totals(audits),
        dropped=dropped,
        holes=sum(len(x.stored.meta["lost_ranges"].split(",")) for x in audits),
        reader_start_503=readers.start_503,
        stored_after_hole=sum(len(stored_after_holes(x)) for x in audits),
        forced=forced_reasons(audits),
        peak_rss_mb=peak,
    )


def stored_after_holes(x: Audit) -> list[int]:
    last_hole = max(marked_losses(x.stored.meta), default=0)
    return [seq for seq in x.stored.entries if seq > last_hole]


@pytest.mark.timeout(300)
async def test_slow_redis_with_a_small_writer_bound(
    make_redis: RedisFactory,
    direct: DirectFactory,
    forwarder: ForwarderFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    """Redis slower than the events come (each round trip 0.3 s): the backlog fills and
    drains over and over, so a run gets several holes, some while the events before an
    earlier hole still wait; each hole is recorded, and every run is stored to its end."""
    redis = make_redis(aof=True)
    client = direct(redis)
    net = await forwarder(redis)
    a = await sidecars("a", net.url, writer_max_bytes=128 << 10, flush_max_events=64)
    await net.set_delay(0.15)  # each way
    began = time.monotonic()
    live = traffic.start(a, 20, interval=0.02, min_events=10**9)
    await traffic.received(live, 300, timeout=120)
    for run in live:
        run.max_events = len(run.sent)
    traffic.finish()
    await traffic.ended(live, timeout=60)
    traffic_seconds = time.monotonic() - began
    await net.set_delay(0)
    scrape = await a.settled(http, timeout=60)
    audits = await audit(live, client, http, a)
    lost = [check_marked(x, kinds={"events_lost"}) for x in audits]
    dropped = scrape.by(P + "writer_dropped_events_total", "reason")
    assert dropped == {"overflow": sum(len(m) for m in lost)}
    # A slow Redis, the process with CPU to spare: pacing (for a process out of CPU,
    # sidecar/pace.py) holds the tees at most half the time, 1 s at a time, and only on a burst
    # of CPU (none on a quiet machine; 2.3 s in a CI run with other tests on the same cores):
    # the events still overflowed past the bound, as they must.
    paced = scrape.value(P + "upstream_paced_seconds_total")
    assert paced <= traffic_seconds / 2
    holes = [len(x.stored.meta["lost_ranges"].split(",")) for x in audits]
    assert max(holes) > 1  # the case made runs with several holes
    assert forced_reasons(audits) == {"natural": 20}
    record(
        "redis_slow_0.3s_round_trip_writer_bound_128KiB",
        **totals(audits),
        dropped=dropped,
        holes=sum(holes),
        most_holes_in_a_run=max(holes),
        forced=forced_reasons(audits),
        peak_rss_mb=bounded_rss(a),
    )
