"""README's "Faults: what happens, measured" table, from the figures the fault cases recorded.

``make test-faults`` runs every case with ``FAULTS_REPORT_DIR=.run/faults`` (each case writes
one JSON line there) and then ``python -m tests.faults.report .run/faults``, which prints the
table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# case (as recorded) -> (what the fault is, the test that measures it)
CASES: dict[str, tuple[str, str]] = {
    "redis_sigkill_restart_aof": (
        "Redis SIGKILL mid-stream, restarted with its AOF (fsync always)",
        "test_redis_restart.py::test_redis_sigkill_and_restart[aof]",
    ),
    "redis_sigkill_restart_no_persistence": (
        "Redis SIGKILL mid-stream, restarted empty (no persistence)",
        "test_redis_restart.py::test_redis_sigkill_and_restart[no_persistence]",
    ),
    "redis_sigstop_5s_lease_3s": (
        "Redis SIGSTOP 5 s, lease 3 s; 2 replicas, followers and status calls",
        "test_redis_hang.py -k sigstop-5s",
    ),
    "redis_sigstop_30s_lease_30s": (
        "Redis SIGSTOP 30 s, lease 30 s (default); 2 replicas, followers and status calls",
        "test_redis_hang.py -k sigstop-30s (long)",
    ),
    "redis_sigstop_60s_lease_30s": (
        "Redis SIGSTOP 60 s, lease 30 s (default); 2 replicas, followers and status calls",
        "test_redis_hang.py -k sigstop-60s (long)",
    ),
    "redis_blackhole_5s_lease_3s": (
        "network to Redis black-holed 5 s, then reset (the producer's link heals half a lease "
        "after the other replica's), lease 3 s",
        "test_redis_hang.py -k blackhole-5s",
    ),
    "redis_blackhole_60s_lease_30s": (
        "network to Redis black-holed 60 s, then reset, lease 30 s",
        "test_redis_hang.py -k blackhole-60s (long)",
    ),
    "redis_down_6s_writer_bound_256KiB": (
        "Redis down 6 s with writer_max_bytes 256 KiB; followers on a 2nd replica",
        "test_overflow.py -k down-6s",
    ),
    "redis_down_45s_writer_bound_4096KiB": (
        "Redis down 45 s with writer_max_bytes 4 MiB; followers on a 2nd replica",
        "test_overflow.py -k down-45s (long)",
    ),
    "redis_slow_0.3s_round_trip_writer_bound_128KiB": (
        "Redis 0.3 s per round trip, writer_max_bytes 128 KiB, flush_max_events 64",
        "test_overflow.py::test_slow_redis_with_a_small_writer_bound",
    ),
    "redis_failover_to_a_lagging_replica": (
        "failover to a replica that lagged (its replication link stalled while the primary "
        "acknowledged writes), lease 3 s",
        "test_failover.py",
    ),
    "redis_flushall_live_and_quiet": (
        "FLUSHALL while 10 runs stream and 10 are quiet; followers on both replicas",
        "test_flushall.py",
    ),
    "sidecar_sigterm_drain_second_replica": (
        "sidecar SIGTERM (drain 2 s), 10 runs ending within it, 10 endless; followers on B",
        "test_sidecar_death.py::test_sigterm_drains_with_a_second_replica",
    ),
    "sidecar_sigkill_second_replica_lease_3s": (
        "sidecar SIGKILL, second replica, nobody reading, lease 3 s",
        "test_sidecar_death.py -k lease3s",
    ),
    "sidecar_sigkill_second_replica_lease_30s": (
        "sidecar SIGKILL, second replica, nobody reading, lease 30 s (default)",
        "test_sidecar_death.py -k lease30s (long)",
    ),
    "burst_1000_run_starts": (
        "1,000 run starts at once, x4: healthy / Redis black-holed, new / chosen run ids",
        "test_burst.py",
    ),
    "one_run_start_during_a_redis_hang": (
        "one run with a chosen id started while Redis hangs, before and after the sidecar noticed",
        "test_burst.py::test_one_run_start_during_a_redis_hang",
    ),
    "background_task_crashes": (
        "writer, sweep, probe, follower crashed 3x (SIGUSR1 hook), during an outage and "
        "before SIGTERM",
        "test_background.py",
    ),
}

COMMON = ("case", "runs", "sent", "live", "stored", "replayed", "forced", "dropped")


def _dict(value: Any) -> str:
    if not value:
        return "-"
    return ", ".join(f"{k} {_num(v)}" for k, v in sorted(value.items()))


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_num(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "/".join(_num(v) for v in value)
    return str(value)


def row(figures: dict[str, Any]) -> str:
    case = figures["case"]
    what, test = CASES.get(case, (case, "?"))
    events = " / ".join(_num(figures.get(k, "-")) for k in ("sent", "live", "stored", "replayed"))
    more = "; ".join(f"{k} {_num(v)}" for k, v in sorted(figures.items()) if k not in COMMON)
    return (
        f"| {what} | {_num(figures.get('runs', '-'))} | {events} | "
        f"{_dict(figures.get('dropped'))} | {_dict(figures.get('forced'))} | {more} | "
        f"`{test}` |"
    )


def table(directory: Path) -> str:
    found = {
        json.loads(p.read_text())["case"]: json.loads(p.read_text())
        for p in sorted(directory.glob("*.json"))
    }
    order = [c for c in CASES if c in found] + sorted(set(found) - set(CASES))
    lines = [
        "| fault | runs | events sent / live / stored / replayed | lost (counted, by reason) "
        "| terminals (forced reason) | measured | case (`tests/faults/`) |",
        "|---|---|---|---|---|---|---|",
        *(row(found[c]) for c in order),
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else ".run/faults")))
