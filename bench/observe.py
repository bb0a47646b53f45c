"""What the driver reads around each measurement: the sidecar's /metrics, Redis INFO and CLIENT
LIST, and /proc of the processes under test."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from redis import Redis

from bench.procs import Service, http_get

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def scrape(sidecar: Service) -> Samples:
    return parse_metrics(http_get(f"http://127.0.0.1:{sidecar.extra['admin']}/metrics"))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def histogram_delta(before: Samples, after: Samples, name: str) -> dict[str, float]:
    """Count, mean and bucket-estimated p50/p99 of what a histogram observed in between."""
    buckets: dict[float, float] = {}
    for (n, ls), v in after.items():
        if n == f"{name}_bucket":
            le = dict(ls)["le"]
            bound = math.inf if le == "+Inf" else float(le)
            # Summed over the other labels (a sidecar's workers each have their series).
            buckets[bound] = buckets.get(bound, 0.0) + v - before.get((n, ls), 0.0)
    count = total(after, f"{name}_count") - total(before, f"{name}_count")
    s = total(after, f"{name}_sum") - total(before, f"{name}_sum")
    result = {"count": count, "mean": s / count if count else math.nan}
    for q, key in ((0.5, "p50_le"), (0.99, "p99_le")):
        result[key] = _bucket_quantile(buckets, count, q)
    return result


def _bucket_quantile(buckets: dict[float, float], count: float, q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (what a histogram can tell)."""
    if not count:
        return math.nan
    for bound in sorted(buckets):
        if buckets[bound] >= q * count:
            return bound
    return math.inf


@dataclass
class RedisStats:
    commands: float
    by_command: dict[str, float]
    clients: int

    @classmethod
    def take(cls, r: Redis) -> RedisStats:
        stats: dict[str, Any] = r.info("stats")
        cmd: dict[str, Any] = r.info("commandstats")
        clients: dict[str, Any] = r.info("clients")
        by = {k.removeprefix("cmdstat_"): float(v["calls"]) for k, v in cmd.items()}
        return cls(float(stats["total_commands_processed"]), by, int(clients["connected_clients"]))

    def minus(self, earlier: RedisStats) -> dict[str, Any]:
        by = {
            k: v - earlier.by_command.get(k, 0.0)
            for k, v in self.by_command.items()
            if v - earlier.by_command.get(k, 0.0) > 0
        }
        # The driver's own INFO calls (3 per snapshot) are not the system's.
        own = 3.0
        if "info" in by:
            by["info"] -= own
            if by["info"] <= 0:
                del by["info"]
        return {"commands": self.commands - earlier.commands - own, "by_command": by}


def client_count(r: Redis, exclude_self: bool = True) -> int:
    """Connections Redis holds (its CLIENT LIST), without the driver's own."""
    clients: list[dict[str, Any]] = r.client_list()
    if not exclude_self:
        return len(clients)
    me = r.client_id()
    return sum(1 for c in clients if int(c["id"]) != me)


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _local_ports_of(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (from /proc/net/tcp and its fds)."""
    inodes = _socket_inodes(pid)
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[9]) in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def redis_connections_of(r: Redis, pid: int) -> int:
    """How many of Redis's clients (CLIENT LIST) are connections of process ``pid``."""
    ports = _local_ports_of(pid)
    clients: list[dict[str, Any]] = r.client_list()
    return sum(1 for c in clients if int(str(c["addr"]).rsplit(":", 1)[1]) in ports)
