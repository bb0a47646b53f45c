"""``python -m bench.topologies [--quick]``: the write path and the live tail at 1,000 runs on one
Redis and on a Redis Cluster of 3 primaries (+ 3 replicas), as the store builds them.

- Write path: the sidecar's group-commit writer on a ``RunStore`` (no HTTP, no parsing), 1,000
  runs appending ~150-byte events as fast as the writer takes them (``loadgen.writer_alone``):
  events/s, writer round trips per event and, on the cluster, the pipelined writes per node
  each round trip becomes (one per node it touches, sent in parallel), connections per node.
- Live tail: 1,000 runs followed by the store's live tail (what the follower drives) while a
  writer appends one event to every run ``RATE`` times a second: the lag from the event's
  creation to its delivery, the tail's commands per event and Redis CPU per event (writes and
  tail, summed over the primaries), connections per node. On one Redis both tails are measured:
  the ``XREAD BLOCK`` tail the store uses there, and the sharded pub/sub tail a cluster uses.

Everything runs on this machine's loopback, the writer and the tail in this one process. ``make
bench`` runs the full sizes after the main suite, ``make bench-quick`` the quick ones; figures go
to ``bench/results/<mode>/topologies.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.cluster import ClusterNode

from bench.common import NULL_IDS, WORDS, Clock, now_us, token_event
from bench.loadgen import writer_alone
from bench.procs import ROOT, Stack
from sidecar.errors import StoreError
from sidecar.keys import Keys, RunId
from sidecar.store import Entry, RunStore, TailMode
from sidecar.telemetry import Metrics
from sidecar.writer import Writer
from tests.topologies import RedisClusterTopology

RUNS = 1000
BENCH = "bench-topologies"  # the name of this process's own admin connections
TAIL_COMMANDS = ("xread", "xrange", "ssubscribe", "client|unblock", "client|id")
_SENT_US = re.compile(rb'"t":(\d+)')


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.mode = "quick" if quick else "full"
        self.write_events = 10 if quick else 60  # per run
        self.tail_rounds = 15 if quick else 60  # one event per run per round
        self.rate = 10  # rounds per second


class Target:
    """A Redis (or cluster) the bench runs on: its URL and the primaries' ports."""

    def __init__(self, name: str, url: str, primaries: Callable[[], list[int]]) -> None:
        self.name = name
        self.url = url
        self.primaries = primaries

    def _each(self, fn: Callable[[redis.Redis], Any]) -> list[Any]:
        out = []
        for port in self.primaries():
            with redis.Redis(port=port, client_name=BENCH) as c:
                out.append(fn(c))
        return out

    def flush(self) -> None:
        self._each(lambda c: c.flushall())

    def stats(self) -> tuple[int, float]:
        """(live-tail commands processed, Redis CPU seconds), summed over the primaries."""
        infos = self._each(lambda c: c.info("all"))
        commands = sum(
            int(info.get(f"cmdstat_{name}", {}).get("calls", 0))
            for info in infos
            for name in TAIL_COMMANDS
        )
        cpu = sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)
        return commands, cpu

    def connections(self) -> list[int]:
        """Client connections on each primary, but this bench's own and replication's."""

        def ours(c: redis.Redis) -> int:
            rows: list[dict[str, Any]] = c.client_list()
            return sum(
                1 for r in rows if r.get("name") != BENCH and not {"S", "M"} & set(r["flags"])
            )

        return self._each(ours)


class NodePipelines:
    """Counts the pipelined writes redis-py sends to cluster nodes (a measurement hook)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = ClusterNode.execute_pipeline

    def __enter__(self) -> NodePipelines:
        original = self._original

        async def counted(node: ClusterNode, commands: list[Any]) -> bool:
            self.count += 1
            return await original(node, commands)

        ClusterNode.execute_pipeline = counted  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        ClusterNode.execute_pipeline = self._original  # type: ignore[method-assign]


async def write_path(target: Target, sizes: Sizes) -> dict[str, Any]:
    target.flush()
    with NodePipelines() as pipelines:
        result = await writer_alone(
            redis_url=target.url, runs=RUNS, n=sizes.write_events, prefix="w"
        )
        connections = target.connections()  # the store is closed: what is left is not ours
    events = result["events"]
    node_writes = pipelines.count or result["round_trips"]
    return {
        "target": target.name,
        "events": events,
        "stored": result["stored"],
        "events_per_s": result["events_per_s"],
        "round_trips_per_event": result["round_trips"] / events,
        "node_writes_per_round_trip": node_writes / max(result["round_trips"], 1),
        "cpu_s": result["cpu_s"],
        "idle_connections_after": connections,
    }


class Lags:
    """The live tail's listener: the lag of every delivered event (creation to delivery)."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self.failures = 0
        self.done = asyncio.Event()
        self.expected = 0

    def deliver(self, run_id: RunId, after: int, entries: list[Entry]) -> None:
        now = now_us()
        for e in entries:
            sent = _SENT_US.search(e.data)
            if sent is not None:
                self.lags_ms.append((now - int(sent.group(1))) / 1000)
        if len(self.lags_ms) >= self.expected:
            self.done.set()

    def failed(self, error: StoreError) -> None:
        self.failures += 1
        print(f"  live tail: {error}", file=sys.stderr)

    def recovered(self) -> None:
        pass


async def live_tail(target: Target, sizes: Sizes, mode: TailMode | None) -> dict[str, Any]:
    target.flush()
    keys = Keys()
    runs = [RunId(f"t-{i}") for i in range(RUNS)]
    producer = RunStore(target.url, keys, live_tail=mode)  # same wake-ups as the followers
    writer = Writer(producer, Metrics())
    writer.start()
    streams = [writer.open(r, "bench", {"status": "running"}) for r in runs]
    await writer.flush(60)
    follower = RunStore(target.url, keys, live_tail=mode)
    lags = Lags()
    tail = follower.live_tail(lags)
    tail.start()
    for r in runs:
        tail.follow(r, 0)
    await asyncio.sleep(2.0)  # subscriptions settle (the pub/sub tail subscribes per run)
    try:
        lags.expected = RUNS * sizes.tail_rounds
        commands0, cpu0 = target.stats()
        clock = Clock().start()
        mid = b"00000000-0000-0000-0000-000000000000"
        started = time.perf_counter()
        for seq in range(1, sizes.tail_rounds + 1):
            for stream in streams:
                raw = token_event(mid, WORDS[seq % len(WORDS)], now_us(), NULL_IDS)
                writer.append(stream, seq, raw)
            # Paced: round ``seq`` starts at seq / rate seconds.
            await asyncio.sleep(max(0.0, started + seq / sizes.rate - time.perf_counter()))
        await asyncio.wait_for(lags.done.wait(), 60)
        elapsed = clock.elapsed()
        commands1, cpu1 = target.stats()
        connections = target.connections()
    finally:
        await tail.close()
        await writer.close(10)
        await follower.aclose()
        await producer.aclose()
    events = lags.expected
    ordered = sorted(lags.lags_ms)
    return {
        "target": target.name,
        "tail": follower.tail_mode,
        "events": events,
        "delivered": len(lags.lags_ms),
        "events_per_s": events / elapsed["wall_s"],
        "lag_p50_ms": statistics.median(ordered),
        "lag_p99_ms": ordered[int(len(ordered) * 0.99) - 1],
        "tail_commands_per_event": (commands1 - commands0) / events,
        "redis_cpu_us_per_event": (cpu1 - cpu0) * 1e6 / events,
        "bench_cpu_s": elapsed["cpu_s"],
        "connections_per_primary": connections,
        "tail_failures": lags.failures,
    }


def tables(writes: list[dict[str, Any]], tails: list[dict[str, Any]], sizes: Sizes) -> str:
    out = [
        f"Write path: {RUNS:,} runs x {sizes.write_events} events, as fast as the writer takes "
        "them:",
        "",
        "| Redis | events/s | writer round trips/event | node writes per round trip "
        "| bench CPU s |",
        "|---|---|---|---|---|",
    ]
    for w in writes:
        out.append(
            f"| {w['target']} | {w['events_per_s']:,.0f} | {w['round_trips_per_event']:.4f} | "
            f"{w['node_writes_per_round_trip']:.2f} | {w['cpu_s']:.1f} |"
        )
    out += [
        "",
        f"Live tail: {RUNS:,} runs followed, one event per run {sizes.rate} times a second "
        f"({RUNS * sizes.rate:,} events/s) for {sizes.tail_rounds / sizes.rate:.0f} s:",
        "",
        "| Redis, live tail | events/s delivered | lag p50 ms | lag p99 ms "
        "| tail commands/event | Redis CPU µs/event (writes + tail) | connections per primary |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tails:
        conns = " / ".join(str(c) for c in t["connections_per_primary"])
        out.append(
            f"| {t['target']}, {t['tail']} | {t['events_per_s']:,.0f} | {t['lag_p50_ms']:.1f} "
            f"| {t['lag_p99_ms']:.1f} | {t['tail_commands_per_event']:.3f} "
            f"| {t['redis_cpu_us_per_event']:.1f} | {conns} |"
        )
    return "\n".join(out)


async def run(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    stack = Stack(workdir / "single")
    cluster = RedisClusterTopology(_mkdir(workdir / "cluster"))
    try:
        service = stack.redis()
        single = Target("1 Redis", f"redis://127.0.0.1:{service.port}/0", lambda: [service.port])
        cluster.start()
        three = Target("3+3 Cluster", cluster.url, lambda: [p.port for p in cluster.primaries()])
        writes = [await write_path(t, sizes) for t in (single, three)]
        steps: list[tuple[Target, TailMode | None]] = [
            (single, None),
            (single, "pubsub"),
            (three, None),
        ]
        tails = [await live_tail(t, sizes, mode) for t, mode in steps]
    finally:
        cluster.stop()
        stack.close()
    return {"mode": sizes.mode, "write_path": writes, "live_tail": tails}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _main(quick: bool) -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    # SIGTERM as SIGINT: the finally blocks stop the Redis servers this bench started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sizes = Sizes(quick)
    with tempfile.TemporaryDirectory() as tmp:
        results = await run(sizes, Path(tmp))
    out = ROOT / "bench" / "results" / sizes.mode / "topologies.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(tables(results["write_path"], results["live_tail"], sizes))
    print(f"\n(figures: {out.relative_to(ROOT)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.topologies", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    args = parser.parse_args(argv)
    return asyncio.run(_main(args.quick))


if __name__ == "__main__":
    sys.exit(main())
