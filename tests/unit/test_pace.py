"""The pacer's decisions (sidecar/pace.py) on a clock the test moves: when the tees are held,
when they are let go, and that a slow or silent Redis never holds them for long. The burst it is
for, end to end, is in tests/functional/test_pace_burst.py."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from sidecar import runtime
from sidecar.pace import BUSY_MEMORY, MAX_HOLD, PROGRESS, Pacer
from sidecar.telemetry import Metrics

PACE = 1000


class World:
    """What the pacer looks at: the backlog, the last landing, Redis' health, the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.backlog = 0
        self.landed = 99.0
        self.answering = True
        self.metrics = Metrics()
        self.pacer = Pacer(
            self.metrics,
            pace_bytes=PACE,
            backlog=lambda: self.backlog,
            landed_at=lambda: self.landed,
            answering=lambda: self.answering,
            clock=lambda: self.now,
        )
        self.resumed: list[str] = []

    def busy(self) -> None:
        self.pacer.note_cpu(self.now, 0.95)

    def engage(self, backlog: int) -> None:
        """The backlog at ``backlog``, the process busy: a hold begins."""
        self.backlog = backlog
        self.busy()
        assert self.pacer.engaged()

    def hold(self, name: str) -> None:
        """A reader whose pieces wait (no transport: its body has ended)."""
        self.pacer.hold(name, lambda: self.resumed.append(name), None)

    def at(self, later: float) -> None:
        self.now += later
        self.pacer.review(self.now)

    @property
    def paced(self) -> float:
        value = self.metrics.registry.get_sample_value("sse_sidecar_upstream_paced_seconds_total")
        return 0.0 if value is None else value


@pytest.fixture
def world() -> World:
    return World()


def test_held_only_past_the_mark_while_busy_and_redis_answers(world: World) -> None:
    world.backlog = PACE - 1
    world.busy()
    assert not world.pacer.engaged()  # below the mark
    world.backlog = PACE
    world.pacer.note_cpu(world.now, 0.5)
    assert world.pacer.engaged()  # busy within the last BUSY_MEMORY seconds
    assert world.pacer.holding


def test_not_held_while_the_process_has_cpu_to_spare(world: World) -> None:
    world.backlog = 10 * PACE
    world.pacer.note_cpu(world.now, 0.5)
    assert not world.pacer.engaged()
    world.busy()
    world.now += BUSY_MEMORY  # busy no longer
    assert not world.pacer.engaged()


def test_not_held_while_redis_fails(world: World) -> None:
    world.backlog = 10 * PACE
    world.busy()
    world.answering = False
    assert not world.pacer.engaged()


def test_let_go_once_the_writer_drained_to_half_the_mark(world: World) -> None:
    world.engage(PACE)
    world.hold("a")
    world.hold("b")
    world.landed = world.now + 0.01
    world.backlog = PACE // 2 + 1
    world.at(0.1)
    assert world.pacer.holding
    assert world.resumed == []
    world.backlog = PACE // 2
    world.at(0.1)
    assert not world.pacer.holding
    assert sorted(world.resumed) == ["a", "b"]
    assert world.paced == pytest.approx(0.2)
    assert world.pacer.released_at == world.now
    # Held again as soon as it is past the mark once more (the process still busy).
    world.backlog = PACE
    assert world.pacer.engaged()


def test_a_read_that_ended_is_not_resumed(world: World) -> None:
    world.engage(PACE)
    world.hold("a")
    world.hold("b")
    world.pacer.let_go("a")
    world.backlog = 0
    world.at(0.1)
    assert world.resumed == ["b"]


def test_a_hold_in_which_redis_never_answered_ends_and_none_follows_until_it_does(
    world: World,
) -> None:
    world.engage(PACE)
    world.hold("a")
    world.at(PROGRESS - 0.01)
    assert world.pacer.holding
    world.at(0.02)  # no round trip landed since the hold began
    assert not world.pacer.holding
    assert world.resumed == ["a"]
    world.busy()
    assert not world.pacer.engaged()
    world.landed = world.now + 1
    world.now += 1
    world.busy()
    assert world.pacer.engaged()


def test_a_long_hold_that_hardly_drained_is_followed_by_as_long_free(world: World) -> None:
    """A slow Redis, with the process busy too: a live client waits MAX_HOLD at most at a
    time, and at most half the time."""
    world.engage(2 * PACE)
    for _ in range(int(MAX_HOLD / 0.1) + 1):
        world.landed = world.now
        world.backlog -= 10  # lands, slowly
        world.at(0.1)
    assert not world.pacer.holding
    assert world.paced == pytest.approx(MAX_HOLD, abs=0.11)
    world.busy()
    assert not world.pacer.engaged()
    world.now += MAX_HOLD
    world.busy()
    assert world.pacer.engaged()


def test_a_long_hold_that_drained_well_is_not_followed_by_free_time(world: World) -> None:
    world.engage(4 * PACE)
    for _ in range(int(MAX_HOLD / 0.1) + 1):
        world.landed = world.now
        world.backlog -= PACE // 4  # half of the way to the resume mark in the hold, and more
        world.at(0.1)
    assert not world.pacer.holding
    world.busy()
    assert world.pacer.engaged()


def test_off_when_the_mark_is_zero() -> None:
    metrics = Metrics()
    pacer = Pacer(
        metrics, pace_bytes=0, backlog=lambda: 10**9, landed_at=lambda: 0.0, answering=lambda: True
    )
    pacer.note_cpu(0.0, 1.0)
    assert not pacer.enabled
    assert not pacer.engaged()


@pytest.mark.parametrize(
    ("files", "workers", "limit", "capacity"),
    [
        ({"cpu.max": "max 100000\n"}, 1, None, 1.0),
        ({"cpu.max": "50000 100000\n"}, 1, 0.5, 0.5),
        ({"cpu.max": "200000 100000\n"}, 1, 2.0, 1.0),
        ({"cpu.max": "200000 100000\n"}, 4, 2.0, 0.5),
        ({"cpu.cfs_quota_us": "150000\n", "cpu.cfs_period_us": "100000\n"}, 1, 1.5, 1.0),
        ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, 1, None, 1.0),
        ({}, 2, None, 1.0),
    ],
)
def test_cpu_capacity_follows_the_container_limit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    workers: int,
    limit: float | None,
    capacity: float,
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(runtime, "CGROUP_V1_QUOTA", tmp_path / "cpu.cfs_quota_us")
    monkeypatch.setattr(runtime, "CGROUP_V1_PERIOD", tmp_path / "cpu.cfs_period_us")
    assert runtime.cpu_limit() == limit
    assert math.isclose(runtime.cpu_capacity(workers), capacity)


def test_a_loop_that_never_idles_counts_as_busy_whatever_cpu_it_got(world: World) -> None:
    """On a node whose other processes take the cores (or a container its limit throttles), a
    loop that never idles gets a fraction of a core: its CPU time says half idle; that its
    thread never blocked says otherwise. Measured: with two CPU hogs on this 2-core machine,
    the burst test (tests/functional/test_pace_burst.py) never held, and dropped events in 8 runs
    of 8."""
    world.backlog = PACE
    world.pacer.note_cpu(world.now, 0.45)
    assert not world.pacer.engaged()
    world.pacer.note_cpu(world.now, 0.45, never_idle=True)
    assert world.pacer.engaged()


def test_the_loop_threads_sleeps_are_counted() -> None:
    before = runtime.thread_sleeps()
    if before is None:
        pytest.skip("this OS does not count a thread's context switches")
    time.sleep(0.01)
    after = runtime.thread_sleeps()
    assert after is not None
    assert after > before
