"""Redis capacity figures for README "Capacity planning" (not part of `make bench`).

    .venv/bin/python -m bench.redis_capacity

1. Memory: runs written with the real append script, ``MEMORY USAGE`` of their stream and meta
   keys and the server's ``used_memory`` growth, per event and per run, for a few event sizes
   and run lengths.
2. The live tail on one Redis, 1,000 followed runs: today's shared ``XREAD BLOCK`` follower
   against the sharded pub/sub tail (``sidecar/store/cluster_tail.py``), on the same writes:
   Redis commands and Redis CPU per delivered event, and the idle cost.
3. The sharded pub/sub tail on a 3+3 Redis Cluster, 1,000 followed runs: the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import Stack
from sidecar.follow import Follower
from sidecar.keys import RunId
from sidecar.store import RunStore
from sidecar.store.cluster_tail import ClusterRouting, ClusterTail, SingleRouting
from sidecar.store.connect import ClientOptions, ClusterClients, SingleClients, connect
from sidecar.store.runstore import APPEND_SCRIPT
from sidecar.store.url import parse_redis_url
from sidecar.telemetry import Metrics
from tests.functional.topology_helpers import KEYS, TAIL_APPEND_SCRIPT, Producer, stream_key
from tests.topologies import RedisClusterTopology

RUNS = 1000
ROUNDS = 20
TRICKLE = 2000
IDLE_SECONDS = 10.0


# What a live tail sends (the writer's EVALSHA, and the commands its script runs, are not).
TAIL_COMMANDS = ("xread", "xrange", "ssubscribe", "client|unblock", "client|id")


async def server_stats(client: Any) -> tuple[int, float]:
    """(live-tail commands processed, Redis CPU seconds) summed over the primaries."""
    if _is_cluster(client):
        infos = await client.info("all", target_nodes="primaries")
    else:
        infos = {"one": await client.info("all")}
    commands = sum(
        int(info.get(f"cmdstat_{name}", {}).get("calls", 0))
        for info in infos.values()
        for name in TAIL_COMMANDS
    )
    cpu = sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos.values())
    return commands, cpu


def _add(counter: list[int], entries: list[Any]) -> None:
    counter[0] += len(entries)


def _is_cluster(client: Any) -> bool:
    return hasattr(client, "nodes_manager")


async def memory(url: str) -> None:
    clients = connect(parse_redis_url(url), ClientOptions())
    assert isinstance(clients, SingleClients)
    r = clients.general
    print("| data bytes/event | events/run | stream key B/event | meta key B | used_memory B/run |")
    print("|---|---|---|---|---|")
    for size in (150, 400, 1500):
        for per_run in (50, 500, 5000):
            await r.flushall()
            await r.script_load(APPEND_SCRIPT)
            before = int((await r.info("memory"))["used_memory"])
            runs = [f"mem-{i}" for i in range(20)]
            producer = Producer(r, script=APPEND_SCRIPT, pad=size - len("mem-0:0000"))
            for start in range(0, per_run, 100):
                await producer.append(runs, min(100, per_run - start))
            after = int((await r.info("memory"))["used_memory"])
            stream_b: Any = await r.memory_usage(stream_key(runs[0]), samples=0)
            meta_b: Any = await r.memory_usage(stream_key(runs[0]) + ":meta", samples=0)
            print(
                f"| {size} | {per_run} | {stream_b / per_run:.0f} | {meta_b} | "
                f"{(after - before) / len(runs):,.0f} |"
            )
    await clients.aclose()


async def tail_single(url: str) -> None:
    names = [f"tail-{i}" for i in range(RUNS)]
    print(
        f"\n1 Redis, {RUNS} runs followed ({ROUNDS} rounds of one event per run; "
        f"then {TRICKLE} events one at a time):"
    )
    print(
        "| live tail | tail commands/event | Redis CPU µs/event (writes + tail) "
        "| idle tail commands/s | connections |"
    )
    print("|---|---|---|---|---|")
    for trickle in (False, True):
        for xread in (True, False):
            print(await _single_design(url, names, xread=xread, trickle=trickle))


async def _single_design(url: str, names: list[str], *, xread: bool, trickle: bool) -> str:
    clients = connect(parse_redis_url(url), ClientOptions())
    assert isinstance(clients, SingleClients)
    r = clients.general
    await r.flushall()
    script = APPEND_SCRIPT if xread else TAIL_APPEND_SCRIPT
    await r.script_load(script)
    producer = Producer(r, script=script)
    await producer.append(names, 1)
    delivered = [0]
    subs = []
    if xread:
        store = RunStore(url, KEYS)
        follower = Follower(store, Metrics())
        follower.start()
        subs = [follower.subscribe(RunId(n), 1, 1 << 30) for n in names]

        async def close() -> None:
            await follower.close()
            await store.aclose()

    else:
        tail = ClusterTail(SingleRouting(r, clients.pubsub), lambda _k, e: _add(delivered, e))
        tail.start()
        for n in names:
            tail.follow(stream_key(n), 1)
        close = tail.close
    await asyncio.sleep(1.0)  # subscriptions settle
    c0, cpu0 = await server_stats(r)
    if trickle:
        # One event at a time to one run (round-robin): each wakes the tail on its own.
        events = TRICKLE
        for i in range(events):
            await producer.append([names[i % len(names)]], 1)
    else:
        events = len(names) * ROUNDS
        for _ in range(ROUNDS):
            await producer.append(names, 1)
    while delivered[0] + sum(s.cursor - 1 for s in subs) < events:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    c1, cpu1 = await server_stats(r)
    await asyncio.sleep(IDLE_SECONDS)
    c2, _ = await server_stats(r)
    connected = int((await r.info("clients"))["connected_clients"])
    await close()
    await clients.aclose()
    design = "XREAD BLOCK follower" if xread else "sharded pub/sub tail"
    design += ", one event at a time" if trickle else f", {len(names)} runs' events per round"
    return (
        f"| {design} | {(c1 - c0) / events:.3f} | {(cpu1 - cpu0) * 1e6 / events:.1f} | "
        f"{(c2 - c1) / IDLE_SECONDS:.1f} | {connected} |"
    )


async def tail_cluster(workdir: Path) -> None:
    topology = RedisClusterTopology(workdir)
    topology.start()
    try:
        clients = connect(parse_redis_url(topology.url), ClientOptions())
        assert isinstance(clients, ClusterClients)
        g = clients.general
        await g.script_load(TAIL_APPEND_SCRIPT)
        names = [f"ctail-{i}" for i in range(RUNS)]
        producer = Producer(g)
        await producer.append(names, 1)
        delivered = [0]
        tail = ClusterTail(ClusterRouting(g, clients.node_pubsub), lambda _k, e: _add(delivered, e))
        tail.start()
        for n in names:
            tail.follow(stream_key(n), 1)
        await asyncio.sleep(1.0)
        c0, cpu0 = await server_stats(g)
        for _ in range(ROUNDS):
            await producer.append(names, 1)
        while delivered[0] < RUNS * ROUNDS:  # noqa: ASYNC110  (a count has no event)
            await asyncio.sleep(0.01)
        c1, cpu1 = await server_stats(g)
        await asyncio.sleep(IDLE_SECONDS)
        c2, _ = await server_stats(g)
        events = RUNS * ROUNDS
        print(f"\n3+3 Redis Cluster, {RUNS} runs followed, {ROUNDS} events per run:")
        print(
            f"sharded pub/sub tail: {(c1 - c0) / events:.3f} tail commands/event, Redis CPU "
            f"(writes + tail, 3 primaries) {(cpu1 - cpu0) * 1e6 / events:.1f} µs/event, "
            f"idle {(c2 - c1) / IDLE_SECONDS:.1f} tail commands/s, subscribed connections "
            f"{len(tail.nodes)} (one per primary), {tail.stats.read_rounds} read rounds"
        )
        await tail.close()
        await clients.aclose()
    finally:
        topology.stop()


async def main() -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            redis_service = stack.redis()
            url = f"redis://127.0.0.1:{redis_service.port}/0"
            await memory(url)
            await tail_single(url)
        finally:
            stack.close()
        with contextlib.suppress(KeyboardInterrupt):
            await tail_cluster(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
