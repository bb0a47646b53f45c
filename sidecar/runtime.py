"""The process the sidecar runs in: its garbage collector, and how much CPU it can use.

A sidecar is a long-lived server whose heap grows with its connections (a thousand streams and
their readers hold a few hundred thousand objects) while each event allocates and frees a few
dozen short-lived ones. With CPython's default thresholds (700, 10, 10) a thousand streams
coming and going promote many objects, and the collector keeps walking them: in one bench run
(2 x 300 and 2 x 1,000 streams, 250,000 events) it ran 1,154 young, 105 middle and 9 full
collections, 6.6 s in all, full ones up to 594 ms (the tail of the latency at 1,000 streams).

So, once the process has started (imports, settings, the app built), everything alive is frozen
out of the collector's view (``gc.freeze``: never walked again), and the thresholds are raised:
the young count is of net allocations (reference counting frees almost everything an event
allocates, and that does not count), so a young collection comes when 10,000 new objects
survive, which happens while connections open, rarely otherwise; middle and full collections
become rare. The same run: 43 young collections, no others, 0.9 s in all, at most 72 ms. A
larger young threshold (50,000) made the rarer collections longer (up to 198 ms).
"""

from __future__ import annotations

import gc
import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

# A young collection every 10,000 net allocations (default 700), a middle one every 50 young ones
# (10), a full one every 100 middle ones (10) and, CPython's own rule, only once the long-lived
# objects grew by a quarter.
GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc() -> None:
    """Called once the process has started: freeze what is alive, raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


# cgroup v2, then v1: the container's CPU limit (Kubernetes resources.limits.cpu).
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cpu_limit() -> float | None:
    """The container's CPU limit in cores, if it has one (None: no limit, or not readable)."""
    try:
        quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = CGROUP_V1_QUOTA.read_text().strip()
            period = CGROUP_V1_PERIOD.read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cores if cores > 0 else None


def cpu_capacity(workers: int) -> float:
    """CPU seconds per second one worker process can use: one core (its event loop is one
    thread), or its share of the container's limit when that is less."""
    limit = cpu_limit()
    share = 1.0 if limit is None else limit / max(1, workers)
    return min(1.0, share)


def thread_sleeps() -> int | None:
    """How often the calling thread has given up the CPU by itself so far (blocked: for the
    event loop's thread, mostly waiting for something to do); None where the OS does not say.

    A loop that never idles never blocks: its ready callbacks and sockets make each poll return
    at once. That holds on a node whose other processes take the cores, or in a container its
    CPU limit throttles, where its CPU time alone (less than a core) says half idle. Not the
    thread's run-queue wait: a light loop that wakes a thousand times a second waits a little
    at every wake-up on a crowded node, and looks as if it wanted the CPU all the time."""
    if _RUSAGE_THREAD is None:
        return None
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux only
