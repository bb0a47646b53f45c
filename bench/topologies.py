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
        self.tail_rounds = 10 if quick else 40  # one event per run per round
        self.rate = 5  # rounds per second


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
    """1,000 runs, ``write_events`` each, appended 8 at a time per run in rounds over all runs
    (one producer loop; it waits while two round trips' worth is buffered)."""
    target.flush()
    store = RunStore(target.url, Keys())
    metrics = Metrics()
    writer = Writer(store, metrics)
    writer.start()
    runs = [writer.open(RunId(f"w-{i}"), "bench", {"status": "running"}) for i in range(RUNS)]
    await writer.flush(60)
    mid = b"00000000-0000-0000-0000-000000000000"
    limit = 2 * 512
    try:
        with NodePipelines() as pipelines:
            flushes0 = _flushes(metrics)
            clock = Clock().start()
            for first in range(1, sizes.write_events + 1, 8):
                for run in runs:
                    for seq in range(first, min(first + 8, sizes.write_events + 1)):
                        raw = token_event(mid, WORDS[seq % len(WORDS)], now_us(), NULL_IDS)
                        writer.append(run, seq, raw, complete=seq == sizes.write_events)
                    while writer.pending_events > limit:  # noqa: ASYNC110 - no event to await
                        await asyncio.sleep(0.0005)
            await writer.flush(60)
            elapsed = clock.elapsed()
            round_trips = _flushes(metrics) - flushes0
        stored = sum([await store.length(r.run_id) for r in runs])
    finally:
        await writer.close(10)
        await store.aclose()
    events = RUNS * sizes.write_events
    return {
        "target": target.name,
        "events": events,
        "stored": stored,
        "events_per_s": events / elapsed["wall_s"],
        "cpu_us_per_event": elapsed["cpu_s"] * 1e6 / events,
        "round_trips_per_event": round_trips / events,
        "node_writes_per_round_trip": (pipelines.count or round_trips) / max(round_trips, 1),
        "connections_after": target.connections(),
    }


def _flushes(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("sse_sidecar_flushes_total", {"outcome": "ok"})
    return float(value or 0.0)


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


async def produce(url: str, mode: TailMode | None, rounds: int, rate: float) -> None:
    """The producer of the live-tail case (a child process): one event to every run ``rate``
    times a second, ``rounds`` times, through the writer; each event carries its send time."""
    producer = RunStore(url, Keys(), live_tail=mode)  # the same wake-ups as the followers
    writer = Writer(producer, Metrics())
    writer.start()
    streams = [writer.open(RunId(f"t-{i}"), "bench", {"status": "running"}) for i in range(RUNS)]
    await writer.flush(60)
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    mid = b"00000000-0000-0000-0000-000000000000"
    started = time.perf_counter()
    try:
        for seq in range(1, rounds + 1):
            for stream in streams:
                writer.append(stream, seq, token_event(mid, WORDS[seq % 8], now_us(), NULL_IDS))
            # Paced: round ``seq`` starts at seq / rate seconds.
            await asyncio.sleep(max(0.0, started + seq / rate - time.perf_counter()))
        await writer.flush(60)
    finally:
        await writer.close(10)
        await producer.aclose()


async def live_tail(target: Target, sizes: Sizes, mode: TailMode | None) -> dict[str, Any]:
    target.flush()
    follower = RunStore(target.url, Keys(), live_tail=mode)
    lags = Lags()
    lags.expected = RUNS * sizes.tail_rounds
    tail = follower.live_tail(lags)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.topologies", "--produce", target.url,
        "--tail", follower.tail_mode, "--rounds", str(sizes.tail_rounds),
        "--rate", str(sizes.rate),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"ready"
        tail.start()
        for i in range(RUNS):
            tail.follow(RunId(f"t-{i}"), 0)
        await asyncio.sleep(2.0)  # subscriptions settle (the pub/sub tail subscribes per run)
        commands0, cpu0 = target.stats()
        clock = Clock().start()
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        await asyncio.wait_for(lags.done.wait(), 120)
        elapsed = clock.elapsed()
        commands1, cpu1 = target.stats()
        assert await child.wait() == 0
        connections = target.connections()  # the follower's (the producer has exited)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await tail.close()
        await follower.aclose()
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
        "tail_cpu_us_per_event": elapsed["cpu_s"] * 1e6 / events,
        "tail_commands_per_event": (commands1 - commands0) / events,
        "redis_cpu_us_per_event": (cpu1 - cpu0) * 1e6 / events,
        "connections_per_primary": connections,
        "tail_failures": lags.failures,
    }


def tables(writes: list[dict[str, Any]], tails: list[dict[str, Any]], sizes: Sizes) -> str:
    out = [
        f"Write path: {RUNS:,} runs x {sizes.write_events} events, as fast as the writer takes "
        "them (one process):",
        "",
        "| Redis | events/s | CPU µs/event | writer round trips/event "
        "| node writes per round trip |",
        "|---|---|---|---|---|",
    ]
    for w in writes:
        out.append(
            f"| {w['target']} | {w['events_per_s']:,.0f} | {w['cpu_us_per_event']:.1f} | "
            f"{w['round_trips_per_event']:.4f} | {w['node_writes_per_round_trip']:.2f} |"
        )
    out += [
        "",
        f"Live tail: {RUNS:,} runs followed by one process, while another writes one event per "
        f"run {sizes.rate:g} times a second ({RUNS * sizes.rate:,.0f} events/s) for "
        f"{sizes.tail_rounds / sizes.rate:.0f} s:",
        "",
        "| Redis, live tail | events/s delivered | lag p50 ms | lag p99 ms | follower CPU µs/event "
        "| tail commands/event | Redis CPU µs/event (writes + tail) | connections per primary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tails:
        conns = " / ".join(str(c) for c in t["connections_per_primary"])
        out.append(
            f"| {t['target']}, {t['tail']} | {t['events_per_s']:,.0f} | {t['lag_p50_ms']:.1f} "
            f"| {t['lag_p99_ms']:.1f} | {t['tail_cpu_us_per_event']:.1f} "
            f"| {t['tail_commands_per_event']:.3f} | {t['redis_cpu_us_per_event']:.1f} | {conns} |"
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
    parser.add_argument("--produce", metavar="URL", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--tail", choices=("xread", "pubsub"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.produce:
        asyncio.run(produce(args.produce, args.tail, args.rounds, args.rate))
        return 0
    return asyncio.run(_main(args.quick))


if __name__ == "__main__":
    sys.exit(main())
