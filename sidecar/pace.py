"""Pacing: the tees hold their upstream reads while the process's own relaying starves its writer.

A process that relays faster than its writer stores (a saturating upstream; the measured case:
100 streams sent as fast as they go, 107,000 events/s relayed for 12.7 s) does not fall behind
because Redis is slow: Redis used 0.07 s of CPU in that run. The event loop was busy with the
tees, the writer's round trips waited behind whole loop turns of relaying (p99 2.5 s), it stored
28,000 events/s, and the backlog passed ``writer_max_bytes``: 1,014,771 of 1,367,700 events were
dropped. Relaying faster than one can store only turns the difference into loss.

So when the writer's backlog passes ``pace_bytes`` *and* the process is out of CPU (over a tick
of ``TICK`` s it used at least ``BUSY_SHARE`` of what it can use: one core, or its share of the
container's CPU limit, ``runtime.cpu_capacity``; or its loop's thread never blocked in the tick,
``runtime.thread_sleeps``: it had work all the time, whatever CPU a crowded node or a throttling
limit let it have; it counts as busy for ``BUSY_MEMORY`` s after; a tick that a long loop turn
holds back is judged by the tee that asks, from what happened since the last tick)
*and* Redis is answering (its last command did not fail), the tees stop taking their upstreams'
bytes: each read's pieces wait, and its connection's transport is paused (the upstream's writes
then wait in TCP, as for any slow reader), until the backlog is half of ``pace_bytes``, for at
most ``MAX_HOLD`` s at a time. The CPU goes to the writer, which catches up at its own rate.

What it is not for: holding the tees for Redis (DESIGN.md: neither a client nor Redis can stall
the tee). A Redis that is slow or unreachable while the process has CPU to spare leaves the
tees reading; the backlog then fills, and overflow drops are counted and recorded as before.
The CPU is judged per tick, so a burst (a garbage collection, a large round trip) can count as
busy, and a slow Redis may then hold the tees too, within the bounds below (a CI run with other
tests on the same two cores measured 2.3 s of holds in the slow-Redis fault case; a quiet
machine none).
Whether Redis answers cannot be told from a busy process (a reply waits for a loop turn either
way), so the hold itself is the test: a hold in which no round trip landed within ``PROGRESS``
s ends, and no other begins until one lands. A hold ends after ``MAX_HOLD`` in any case, and
one in which the writer did not drain half of what it had to is followed by as long a time
free: a live client waits at most that long at a time, and at most half the time, for a busy
writer, however slow its Redis.

Measured (``python -m bench --profile 5 --profile-load saturation``: two rounds of 100 streams
sent as fast as they go, 5-15 s each): before, the round above; with pacing, 0 events dropped in
each of 4 rounds (523,800-843,400 events), stored at 65,000-78,000 events/s, which is now also
the rate relayed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from sidecar.background import Background
from sidecar.runtime import thread_sleeps
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)

TICK = 0.05  # seconds between two looks at the process's CPU (and at a hold's end)
# Not the loop's lateness: a loop out of CPU with many small callbacks still runs its timers
# nearly on time (measured: ticks on time while the backlog grew 30 MB/s).
BUSY_SHARE = 0.9  # of the CPU the process can use, over a tick: it is out of CPU
BUSY_MEMORY = 2.0  # ... and counts as busy this long after (a hold frees the CPU meanwhile)
PROGRESS = 0.5  # a hold in which no writer round trip landed within this: Redis is not answering
MAX_HOLD = 1.0  # the longest hold, and the free time after one in which the writer hardly drained
QUIET_LOG = 60.0  # a hold is logged when none was for this long


class Pacer:
    """When the tees may read their upstreams: ``engaged()`` is asked before the pieces of each
    upstream read are taken."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        pace_bytes: int,
        backlog: Callable[[], int],
        landed_at: Callable[[], float],
        answering: Callable[[], bool],
        capacity: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._m = metrics
        self._pace = pace_bytes
        self._resume = pace_bytes // 2
        self._backlog = backlog
        self._landed_at = landed_at
        self._answering = answering
        self._busy_cpu = BUSY_SHARE * capacity  # CPU seconds per second
        self._clock = clock  # the event loop's clock (asyncio's is time.monotonic)
        # A hold ended without a landing: none begins again until a round trip lands after it.
        self._need_landing_after: float | None = None
        self._held_since = 0.0
        self._held_from = 0  # the backlog when the hold began
        self._busy_until = -math.inf
        # The last tick: when, the process's CPU time then, and how often the loop's thread
        # had blocked (``runtime.thread_sleeps``) (math.inf: no tick yet).
        self._tick_at = math.inf
        self._tick_cpu = 0.0
        self._tick_sleeps: int | None = None
        self._free_until = -math.inf
        self.released_at = -math.inf  # loop time the last hold ended
        # reader -> (its resume, its connection's transport)
        self._held: dict[object, tuple[Callable[[], None], asyncio.Transport | None]] = {}
        self._released = asyncio.Event()  # set while no hold is on: what the tees wait for
        self._released.set()
        self._background = Background("sse-pacer", self._loop, metrics)

    def start(self) -> None:
        if self._pace > 0:
            self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
        self._release(self._clock())

    @property
    def holding(self) -> bool:
        return not self._released.is_set()

    @property
    def enabled(self) -> bool:
        return self._pace > 0

    def engaged(self) -> bool:
        """Whether the tees should hold their reads now (starts a hold when it is time)."""
        if self.holding:
            return True
        if not self.enabled or self._backlog() < self._pace:
            return False
        now = self._clock()
        if now >= self._busy_until and now - self._tick_at >= 2 * TICK:
            # The loop has not ticked for a while: a long turn, relaying (a run's whole body
            # at once). Judged here, or the backlog would pass the bound before the next tick.
            self._note_since_tick(now)
        if now >= self._busy_until or now < self._free_until:
            return False
        if not self._answering():
            return False
        if self._need_landing_after is not None:
            if self._landed_at() <= self._need_landing_after:
                return False
            self._need_landing_after = None
        self._held_since = now
        self._held_from = self._backlog()
        self._released.clear()
        if now - self.released_at >= QUIET_LOG:
            # Once per episode: under a sustained burst holds come every second or so.
            log.info(
                "the writer is behind and the process is out of CPU: upstream reads are held "
                "while it catches up (sse_sidecar_upstream_paced_seconds_total)",
                extra={"reason": "pacing", "pending_bytes": self._backlog()},
            )
        return True

    def hold(
        self,
        reader: object,
        resume: Callable[[], None],
        transport: asyncio.Transport | None,
    ) -> None:
        """``reader`` holds what it read until the hold ends, then ``resume`` is called (it
        takes those pieces); its connection's ``transport``, if it still has one (not once
        the body has ended), reads nothing meanwhile."""
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
        self._held[reader] = (resume, transport)

    def let_go(self, reader: object) -> None:
        """``reader``'s read is over: its connection reads again (it goes back to aiohttp)."""
        held = self._held.pop(reader, None)
        if held is not None and (transport := held[1]) is not None and not transport.is_closing():
            transport.resume_reading()

    async def released(self) -> None:
        """Until the hold ends (for reads that cannot be paused at the transport)."""
        await self._released.wait()

    def _release(self, now: float) -> None:
        if not self.holding:
            return
        self._released.set()
        self.released_at = now
        self._m.upstream_paced_seconds.inc(now - self._held_since)
        held, self._held = self._held, {}
        for resume, transport in held.values():
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
            resume()

    def note_cpu(self, now: float, share: float, *, never_idle: bool = False) -> None:
        """Over the last tick, the process used ``share`` CPU seconds per second; ``never_idle``:
        its loop's thread never blocked (it had work all the time, whatever CPU it got)."""
        if share >= self._busy_cpu or never_idle:
            self._busy_until = now + BUSY_MEMORY

    def _note_since_tick(self, now: float) -> None:
        """Judge the time since the last tick, and make ``now`` the last tick (asked on the
        loop's thread)."""
        cpu, sleeps = time.process_time(), thread_sleeps()
        span = now - self._tick_at
        if span > 0:
            # Measured with two CPU hogs on this 2-core machine: the burst test
            # (tests/functional/test_pace_burst.py) got under 90 % of a core, never held, and
            # dropped events in 8 runs of 8; judged by its sleeps too, it held and dropped
            # nothing in 6 of 6.
            never_idle = sleeps is not None and sleeps == self._tick_sleeps and span >= TICK
            self.note_cpu(now, (cpu - self._tick_cpu) / span, never_idle=never_idle)
        self._tick_at, self._tick_cpu, self._tick_sleeps = now, cpu, sleeps

    def review(self, now: float) -> None:
        """During a hold: end it once the writer caught up, when Redis did not answer in it,
        or once it lasted ``MAX_HOLD`` (then, if the writer hardly drained, the tees get as
        long free)."""
        if not self.holding:
            return
        held = now - self._held_since
        backlog = self._backlog()
        if backlog <= self._resume:
            self._release(now)
        elif held >= PROGRESS and self._landed_at() < self._held_since:
            self._need_landing_after = now
            self._release(now)
        elif held >= MAX_HOLD:
            if self._held_from - backlog < (self._pace - self._resume) // 2:
                # The writer hardly drained with the CPU to itself: its Redis is what is slow.
                self._free_until = now + MAX_HOLD
            self._release(now)

    async def _loop(self) -> None:
        self._tick_at = math.inf
        self._note_since_tick(self._clock())
        try:
            while True:
                await asyncio.sleep(TICK)
                now = self._clock()
                self._note_since_tick(now)
                self.review(now)
        finally:
            self._release(self._clock())
