"""Background tasks that crash, for real, in a sidecar process (the ``SIDECAR_TEST_CRASH`` hook:
SIGUSR1 makes the named tasks fail where they are): each crash is logged with its traceback,
counted in ``sse_sidecar_background_crashes_total{task}`` and the task restarted; a writer that
crashed with events buffered writes them once Redis answers, and still flushes at shutdown
(issue 10, failure 6: a crashed task was silent until shutdown, then skipped the writer's
flush)."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.faults.conftest import DirectFactory, ForwarderFactory, RedisFactory
from tests.faults.harness import (
    Scrape,
    SidecarFactory,
    SidecarProcess,
    Traffic,
    audit,
    bounded_rss,
    check_whole,
    forced_reasons,
    record,
    totals,
)
from tests.functional.helpers import eventually

P = "sse_sidecar_"
CRASHING = ("sse-writer", "sse-orphan-sweep", "sse-redis-probe", "sse-follower")


async def retrying(http: aiohttp.ClientSession, sc: SidecarProcess) -> None:
    """Wait until the writer has failed two more round trips (so it is retrying work that no
    new event will wake it for)."""
    failed = (await sc.scrape(http)).value(P + "flushes_total", outcome="error")

    async def two_more() -> bool:
        now = (await sc.scrape(http)).value(P + "flushes_total", outcome="error")
        return now >= failed + 2

    await eventually(two_more, timeout=15, interval=0.1, what="two failed round trips")


async def crash(http: aiohttp.ClientSession, sc: SidecarProcess, times: int) -> Scrape:
    """SIGUSR1, then wait until every crashing task has crashed ``times`` times in all."""
    sc.signal(signal.SIGUSR1)
    last: list[Scrape] = []

    async def counted() -> bool:
        last[:] = [await sc.scrape(http)]
        crashes = last[0].by(P + "background_crashes_total", "task")
        return crashes == dict.fromkeys(CRASHING, float(times))

    await eventually(counted, timeout=10, interval=0.05, what=f"{times} crashes of each task")
    return last[0]


@pytest.mark.timeout(120)
async def test_crashing_background_tasks_are_restarted_and_the_writer_flushes(
    make_redis: RedisFactory,
    direct: DirectFactory,
    forwarder: ForwarderFactory,
    sidecars: SidecarFactory,
    traffic: Traffic,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    net = await forwarder(redis)
    a = await sidecars(
        "a", net.url, env={"SIDECAR_TEST_CRASH": ",".join(CRASHING)}, drain_seconds=1
    )
    # 1. Crashes while runs stream: the runs are stored whole all the same.
    streaming = traffic.start(a, 10, prefix="streaming", interval=0.05, min_events=10**9)
    await traffic.received(streaming, 5)
    await crash(http, a, 1)
    await traffic.received(streaming, 20)
    for run in streaming:
        run.max_events = len(run.sent)
    # 2. Redis out of reach; runs end with their events buffered; the writer crashes holding
    # them; once Redis answers again, the restarted writer writes them (nothing else wakes it:
    # no run is left).
    await net.blackhole()
    buffered = traffic.start(a, 10, prefix="buffered", interval=0.01, min_events=10, max_events=10)
    traffic.finish()
    await traffic.ended(streaming + buffered, timeout=30)
    await retrying(http, a)
    await crash(http, a, 2)
    await net.reset()
    await net.pass_()
    await a.settled(http)
    # 3. The same, then SIGTERM while Redis is still away; it comes back within the flush
    # deadline, and the writer flushes at shutdown.
    await net.blackhole()
    last = traffic.start(a, 10, prefix="last", interval=0.01, min_events=10, max_events=10)
    await traffic.ended(last, timeout=30)
    await retrying(http, a)
    scrape = await crash(http, a, 3)
    assert scrape.value(P + "writer_pending_events") == 10 * 12
    a.signal(signal.SIGTERM)
    await asyncio.sleep(1.0)  # Redis away for a while into the shutdown: nothing to await
    await net.reset()
    await net.pass_()
    code = await a.exited(timeout=20)
    runs = streaming + buffered + last
    audits = await audit(runs, client, http, await sidecars("reader", net.url))

    assert code == 0, a.output()[-3000:]
    for x in audits:
        check_whole(x)
    log = a.output()
    for task in CRASHING:
        assert log.count(f"background task {task} crashed") == 3
    assert log.count("InjectedCrash: SIDECAR_TEST_CRASH: SIGUSR1") == 3 * len(CRASHING)
    assert "events unwritten" not in log
    record(
        "background_task_crashes",
        **totals(audits),
        crashes=dict.fromkeys(CRASHING, 3),
        forced=forced_reasons(audits),
        exit_code=code,
        peak_rss_mb=bounded_rss(a),
    )
