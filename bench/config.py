"""The sizes of a bench run: ``quick`` (under a minute) and ``full`` (under ten)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Config:
    mode: str
    repeats: int
    # Tee overhead: concurrent streams at the token rate, opened evenly over ramp_seconds; the
    # latency of the events sent in the window_seconds after they are all open (plus
    # settle_seconds) is what is measured.
    levels: tuple[int, ...]
    rate: float
    window_seconds: dict[int, float]
    ramp_seconds: dict[int, float]
    settle_seconds: float
    # The fault suite's shape: streams at the token rate with a replay reader on every run (the
    # windows and ramps of ``levels`` apply).
    reader_levels: tuple[int, ...]
    # Worker scaling: N workers (serve --workers N) carry N x scaling_streams streams with a reader
    # each, and a saturation cell; every N in scaling_workers.
    scaling_streams: int
    scaling_workers: tuple[int, ...]
    # Saturation: streams sent as fast as the path takes them.
    sat_streams: int
    sat_events: int
    # Events per stream of the sustained saturation cell (sat_streams streams): long enough for
    # the writer's backlog to pass its bound if relaying outran storing.
    sustained_events: int
    # Writers alone (sidecar's and Letta's), in-process, no HTTP. At most 50 concurrent runs:
    # Letta's default pool has 50 connections, and past that its runs lose their writes (that
    # case is the paced_runs one below), which would make its throughput meaningless.
    writer_runs: int
    writer_events: int
    # Letta's writer with 1,000 concurrent paced runs (are writes lost?).
    paced_runs: int
    paced_seconds: float
    # Replay.
    lag_readers: tuple[int, ...]
    lag_seconds: float  # the measured window, once every reader is connected
    lag_ramp_seconds: float
    catchup_events: int
    catchup_repeats: int
    idle_readers: int
    idle_ramp_seconds: float
    idle_window_seconds: float
    # redis-benchmark XADD -P 50.
    rb_requests: int
    # Opening runs: short runs opened at a steady rate.
    runs_count: int = 600
    runs_per_s: float = 100.0
    runs_events: int = 3

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_seconds"] = {str(k): v for k, v in self.window_seconds.items()}
        data["ramp_seconds"] = {str(k): v for k, v in self.ramp_seconds.items()}
        return data


QUICK = Config(
    mode="quick",
    repeats=2,
    levels=(1, 100, 1000),
    rate=20.0,
    window_seconds={1: 0.6, 100: 0.5, 1000: 0.5},
    ramp_seconds={1: 0.0, 100: 0.1, 1000: 0.5},
    settle_seconds=0.2,
    reader_levels=(1000,),
    scaling_streams=50,
    scaling_workers=(1, 2),
    sat_streams=50,
    sat_events=400,
    sustained_events=2_000,
    writer_runs=50,
    writer_events=200,
    paced_runs=1000,
    paced_seconds=1.5,
    lag_readers=(1, 1000),
    lag_seconds=0.5,
    lag_ramp_seconds=0.5,
    catchup_events=10_000,
    catchup_repeats=3,
    idle_readers=1000,
    idle_ramp_seconds=0.4,
    idle_window_seconds=1.0,
    rb_requests=100_000,
    runs_count=60,
    runs_per_s=60.0,
)

FULL = Config(
    mode="full",
    repeats=5,
    levels=(1, 100, 1000),
    rate=20.0,
    window_seconds={1: 3.0, 100: 3.0, 1000: 3.0},
    ramp_seconds={1: 0.0, 100: 0.5, 1000: 1.5},
    settle_seconds=0.5,
    reader_levels=(1000,),
    scaling_streams=500,
    scaling_workers=(1, 2),
    sat_streams=100,
    sat_events=1000,
    sustained_events=15_000,
    writer_runs=50,
    writer_events=1000,
    paced_runs=1000,
    paced_seconds=5.0,
    lag_readers=(1, 1000),
    lag_seconds=3.0,
    lag_ramp_seconds=1.0,
    # Long enough that opening the request is not the measure (10,000 events took ~0.1 s).
    catchup_events=100_000,
    catchup_repeats=5,
    idle_readers=1000,
    idle_ramp_seconds=1.0,
    # Longer than the replay heartbeat (15 s): every reader's heartbeat falls in the window once.
    idle_window_seconds=16.0,
    rb_requests=500_000,
)
