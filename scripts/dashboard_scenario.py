#!/usr/bin/env python3
"""Reproduce the README's dashboard scenario end to end and redraw its picture.

It starts, on 127.0.0.1, under a work directory of its own::

    redis-server                  no persistence
    sse-sidecar demo-upstream     the demo LLM service (sidecar/demo/upstream.py)
    sse-sidecar serve  x 2        two sidecars in front of it, one Redis; the second one with a
                                  64 KiB writer bound (--writer-max-bytes 65536)
    prometheus                    5 s scrapes of both admin ports' /metrics, the shipped rule
                                  files (dashboards/prometheus/*.yaml)

then drives about 5 runs a second through the two sidecars (every dialect the demo speaks, 6 %
of the runs ending without their protocol terminal on purpose, a few failing the protocol's own
way) and about one replay read a second (GET /sidecar/v1/runs/{run_id}/stream of a finished or
running run), with two incidents: the LLM upstream stopped (killed) for a minute from minute 7,
then started again on the same port, and Redis stopped for 45 seconds at minute 10.5, then
started again empty on the same port. Incident times scale with ``--minutes`` (7/14 and 10.5/14
of the run; 60/840 and 45/840 of it long, 10 s at least). At the end it draws the dashboard with
``scripts/render_dashboard.py`` from that Prometheus and stops every process it started (also on
Ctrl-C or an error).

    .venv/bin/python scripts/dashboard_scenario.py              # 14 minutes: the README picture
    .venv/bin/python scripts/dashboard_scenario.py --minutes 2 --out /tmp/dash.png --keep
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from sidecar.demo.stack import (
    HOST,
    Child,
    QuickstartError,
    Stack,
    http_ok,
    redis_ping,
    supervised,
    until_ready,
)
from sidecar.keys import Keys
from sidecar.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "scripts" / "render_dashboard.py"
DEFAULT_OUT = ROOT / "dashboards" / "sse-sidecar-overview.png"
RULE_FILES = (
    ROOT / "dashboards" / "prometheus" / "recording-rules.yaml",
    ROOT / "dashboards" / "prometheus" / "alerts.yaml",
)
JOB = "sse-sidecar"
# What Kubernetes service discovery (and an external label) would put on the targets.
TARGET_LABELS = {"cluster": "demo", "namespace": "llm"}
SCRAPE = "5s"
RUN_ID_HEADER = "X-Sidecar-Run-Id"

RUNS_PER_SECOND = 5.0
REPLAYS_PER_SECOND = 1.0
NO_TERMINAL_SHARE = 0.06  # runs that end without their protocol's terminal, on purpose
OWN_ERROR_SHARE = 0.04  # runs that fail the protocol's own way (their terminal still comes)
MAX_IN_FLIGHT = 200  # bound on concurrent runs and replays
PROGRESS_EVERY = 10.0  # seconds between progress lines
SETTLE_SECONDS = 15.0  # after the load: the last scrapes and rule evaluations


@dataclass(frozen=True, slots=True)
class Route:
    dialect: str
    method: str
    path: str
    weight: float
    own_error: str  # the protocol's own way to fail
    no_terminal: tuple[str, ...]  # scenarios that end without the terminal


ROUTES = (
    Route(
        "letta",
        "POST",
        "/v1/agents/agent-demo/messages/stream",
        0.30,
        "error_then_done",
        ("dies", "stop_no_done", "reset"),
    ),
    Route("letta", "GET", "/v1/stream", 0.05, "error_then_done", ("dies", "reset")),
    Route(
        "openai-chat",
        "POST",
        "/v1/chat/completions",
        0.25,
        "error_then_done",
        ("dies", "error_no_done", "reset"),
    ),
    Route("openai-responses", "POST", "/v1/responses", 0.15, "error_then_done", ("dies", "reset")),
    Route(
        "anthropic",
        "POST",
        "/v1/messages",
        0.15,
        "error_then_done",
        ("dies", "stop_no_done", "reset"),
    ),
    Route("generic", "GET", "/v1/events", 0.10, "normal", ("truncated", "reset")),
)


@dataclass(frozen=True, slots=True)
class Timeline:
    total: float
    upstream_at: float
    upstream_for: float
    redis_at: float
    redis_for: float

    @classmethod
    def scaled(cls, minutes: float) -> Timeline:
        total = minutes * 60.0
        return cls(
            total=total,
            upstream_at=total * 7 / 14,
            upstream_for=max(10.0, total * 60 / 840),
            redis_at=total * 10.5 / 14,
            redis_for=max(10.0, total * 45 / 840),
        )

    def phase(self, t: float) -> str:
        if t < self.upstream_at:
            return "steady"
        if t < self.upstream_at + self.upstream_for:
            return "upstream-down"
        if t < self.redis_at:
            return "recovered"
        if t < self.redis_at + self.redis_for:
            return "redis-down"
        if t < self.total:
            return "recovered"
        return "settling"

    def incident(self, t: float) -> str | None:
        """The incident a failure at ``t`` belongs to (a few seconds past its end: its tail)."""
        if self.upstream_at <= t < self.upstream_at + self.upstream_for + 5.0:
            return "upstream"
        if self.redis_at <= t < self.redis_at + self.redis_for + 5.0:
            return "redis"
        return None


@dataclass
class Tally:
    started: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    no_terminal: int = 0
    replays: int = 0
    replays_ok: int = 0
    replays_failed: int = 0
    # "<incident>": {"HTTP 502": n, "broken": n, ...}
    failures: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    dialects: collections.Counter[str] = field(default_factory=collections.Counter)

    def fail(self, incident: str | None, why: str) -> None:
        self.failures[incident or "outside incidents"][why] += 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QuickstartError(f"{name} not found: scripts/ensure-system-deps.sh installs it")
    return path


@dataclass
class Scenario:
    args: argparse.Namespace
    stack: Stack
    timeline: Timeline
    http: aiohttp.ClientSession
    redis_port: int = field(default_factory=free_port)
    upstream_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    sidecars: list[tuple[int, int]] = field(default_factory=list)  # (port, admin port)
    tally: Tally = field(default_factory=Tally)
    recent: collections.deque[tuple[int, str]] = field(
        default_factory=lambda: collections.deque(maxlen=60)
    )
    t0: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(14))
    stopped: set[int] = field(default_factory=set)  # pids stopped on purpose

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.prometheus_port}"

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, what: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        t = self.now() if self.t0 else 0.0
        tl = self.tally
        print(
            f"{stamp} t={t:6.1f}s {self.timeline.phase(t):<13} runs started {tl.started} "
            f"ok {tl.ok} failed {tl.failed} skipped {tl.skipped}; replays {tl.replays} "
            f"ok {tl.replays_ok} failed {tl.replays_failed}  {what}",
            flush=True,
        )

    # -- the processes ---------------------------------------------------------------------

    async def start_redis(self) -> Child:
        child = self.stack.start_redis(binary("redis-server"), self.redis_port)
        store = RunStore(self.redis_url, Keys(), max_connections=2, timeout=2.0)
        try:
            await until_ready(child, self.redis_url, redis_ping(store))
        finally:
            await store.aclose()
        return child

    async def start_upstream(self) -> Child:
        child = self.stack.start_upstream(self.upstream_port)
        health = f"{self.upstream_url}/v1/health"
        await until_ready(child, health, http_ok(self.http, health))
        return child

    async def start_sidecar(self, index: int, extra: list[str]) -> Child:
        port, admin = free_port(), free_port()
        child = self.stack.start(
            f"sidecar-{index}",
            [
                sys.executable, "-m", "sidecar", "serve",
                "--upstream-url", self.upstream_url,
                "--redis-url", self.redis_url,
                "--host", HOST,
                "--port", str(port),
                "--admin-port", str(admin),
                "--log-format", "text",
                "--log-level", "warning",
                "--drain-seconds", "2",
                *extra,
            ],
        )  # fmt: skip
        readyz = f"http://{HOST}:{admin}/readyz"
        await until_ready(child, readyz, http_ok(self.http, readyz))
        self.sidecars.append((port, admin))
        return child

    async def start_prometheus(self) -> Child:
        workdir = self.stack.workdir
        static = [
            {
                "targets": [f"{HOST}:{admin}"],
                "labels": {**TARGET_LABELS, "pod": f"llm-service-{i}"},
            }
            for i, (_, admin) in enumerate(self.sidecars)
        ]
        config = {
            "global": {
                "scrape_interval": SCRAPE,
                "scrape_timeout": SCRAPE,
                "evaluation_interval": SCRAPE,
            },
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [{"job_name": JOB, "static_configs": static}],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
        child = self.stack.start(
            "prometheus",
            [
                binary("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address={HOST}:{self.prometheus_port}",
                "--log.level=warn",
            ],
        )
        ready = f"{self.prometheus_url}/-/ready"
        await until_ready(child, ready, http_ok(self.http, ready))
        deadline = time.monotonic() + 30.0
        while await self.targets_up() < len(self.sidecars):
            if time.monotonic() > deadline:
                raise QuickstartError(f"Prometheus does not scrape both sidecars: {config_file}")
            await asyncio.sleep(0.5)
        return child

    async def targets_up(self) -> int:
        url = f"{self.prometheus_url}/api/v1/query"
        try:
            async with self.http.get(url, params={"query": f'sum(up{{job="{JOB}"}})'}) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0
        result = body.get("data", {}).get("result", [])
        return int(float(result[0]["value"][1])) if result else 0

    # -- the load --------------------------------------------------------------------------

    async def one_run(self, number: int) -> None:
        tl = self.tally
        route = self.rng.choices(ROUTES, weights=[r.weight for r in ROUTES])[0]
        draw = self.rng.random()
        if draw < NO_TERMINAL_SHARE:
            scenario = self.rng.choice(route.no_terminal)
            tl.no_terminal += 1
        elif draw < NO_TERMINAL_SHARE + OWN_ERROR_SHARE:
            scenario = route.own_error
        else:
            scenario = "normal"
        tl.dialects[route.dialect] += 1
        params = {
            "scenario": scenario,
            "tokens": str(self.rng.randint(15, 60)),
            "delay_ms": str(self.rng.randint(25, 70)),
        }
        body = {"model": "demo-llm-1", "stream": True, "messages": []}
        port, _ = self.sidecars[number % len(self.sidecars)]
        url = f"http://{HOST}:{port}{route.path}"
        try:
            async with self.http.request(
                route.method,
                url,
                params=params,
                json=body if route.method == "POST" else None,
                timeout=aiohttp.ClientTimeout(total=120, sock_connect=5),
            ) as resp:
                if resp.status != 200:
                    await resp.read()
                    tl.failed += 1
                    tl.fail(self.timeline.incident(self.now()), f"HTTP {resp.status}")
                    return
                run_id = resp.headers.get(RUN_ID_HEADER)
                if run_id is not None:
                    self.recent.append((port, run_id))
                async for _ in resp.content.iter_any():
                    pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            tl.failed += 1
            tl.fail(self.timeline.incident(self.now()), f"broken ({type(exc).__name__})")
            return
        tl.ok += 1

    async def one_replay(self) -> None:
        tl = self.tally
        if not self.recent:
            return
        _, run_id = self.rng.choice(list(self.recent))
        port, _ = self.rng.choice(self.sidecars)  # either replica: the store is shared
        url = f"http://{HOST}:{port}/sidecar/v1/runs/{run_id}/stream"
        params = {"starting_after": str(self.rng.choice((0, 0, 5, 20)))}
        tl.replays += 1
        try:
            async with self.http.get(
                url, params=params, timeout=aiohttp.ClientTimeout(total=60, sock_connect=5)
            ) as resp:
                if resp.status == 204:  # the run ended, nothing after the cursor: a clean end
                    tl.replays_ok += 1
                    return
                if resp.status != 200:
                    await resp.read()
                    tl.replays_failed += 1
                    tl.fail(self.timeline.incident(self.now()), f"replay HTTP {resp.status}")
                    return
                async for _ in resp.content.iter_any():
                    pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            tl.replays_failed += 1
            tl.fail(self.timeline.incident(self.now()), f"replay broken ({type(exc).__name__})")
            return
        tl.replays_ok += 1

    async def load(self) -> None:
        """Runs and replays at a steady rate until the end of the timeline."""
        tasks: set[asyncio.Task[None]] = set()
        bound = asyncio.Semaphore(MAX_IN_FLIGHT)

        def launch(coro_factory: str, number: int = 0) -> None:
            if bound.locked():
                self.tally.skipped += 1
                return

            async def guarded() -> None:
                async with bound:
                    if coro_factory == "run":
                        await self.one_run(number)
                    else:
                        await self.one_replay()

            if coro_factory == "run":
                self.tally.started += 1
            task = asyncio.create_task(guarded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        runs = replays = 0
        try:
            while (t := self.now()) < self.timeline.total:
                while runs < t * RUNS_PER_SECOND:
                    launch("run", runs)
                    runs += 1
                while replays < t * REPLAYS_PER_SECOND:
                    launch("replay")
                    replays += 1
                await asyncio.sleep(0.05)
            self.say(f"load over; waiting for {len(tasks)} streams in flight")
            if tasks:
                await asyncio.wait(tasks, timeout=60)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self.say("")

    async def incidents(self, upstream: Child, redis: Child) -> None:
        tl = self.timeline
        await self.until(tl.upstream_at)
        self.say(f"incident: the LLM upstream stops for {tl.upstream_for:.0f}s")
        self.stopped.add(upstream.proc.pid)
        upstream.stop(kill=True)
        await self.until(tl.upstream_at + tl.upstream_for)
        new_upstream = await self.start_upstream()
        self.stack.replace(upstream, new_upstream)
        self.say(f"the LLM upstream is back (pid {new_upstream.proc.pid})")
        await self.until(tl.redis_at)
        self.say(f"incident: Redis stops for {tl.redis_for:.0f}s")
        self.stopped.add(redis.proc.pid)
        await asyncio.to_thread(redis.stop)
        await self.until(tl.redis_at + tl.redis_for)
        new_redis = await self.start_redis()
        self.stack.replace(redis, new_redis)
        self.say(f"Redis is back, empty (pid {new_redis.proc.pid})")

    async def until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def watch(self) -> None:
        """Fail if a process dies on its own (the ones stopped on purpose are replaced)."""
        while True:
            for child in list(self.stack.children):
                if child.exited() is not None and child.proc.pid not in self.stopped:
                    raise child.died("unexpectedly")
            await asyncio.sleep(1.0)

    # -- all of it -------------------------------------------------------------------------

    async def run(self) -> int:
        tl = self.timeline
        print(
            f"dashboard scenario: {self.args.minutes:g} minutes; upstream down at "
            f"{tl.upstream_at:.0f}s for {tl.upstream_for:.0f}s, Redis down at {tl.redis_at:.0f}s "
            f"for {tl.redis_for:.0f}s; work dir {self.stack.workdir}",
            flush=True,
        )
        redis = await self.start_redis()
        upstream = await self.start_upstream()
        await self.start_sidecar(0, [])
        await self.start_sidecar(1, ["--writer-max-bytes", "65536"])
        await self.start_prometheus()
        for child in self.stack.children:
            print(f"  {child.name:<11} pid {child.proc.pid:<8} log {child.log}", flush=True)
        print(f"  prometheus  {self.prometheus_url}", flush=True)

        self.t0 = time.monotonic()
        self.say("load starts")
        progress = asyncio.create_task(self.progress())
        incidents = asyncio.create_task(self.incidents(upstream, redis))
        watcher = asyncio.create_task(self.watch())
        load = asyncio.create_task(self.load())
        tasks = (progress, incidents, watcher, load)
        try:
            pending: set[asyncio.Task[None]] = {load, incidents, watcher}
            while not load.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what went wrong (the watcher: a process died)
            await incidents  # they end before the load does
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.say(f"settling {SETTLE_SECONDS:.0f}s: the last scrapes and rule evaluations")
        await asyncio.sleep(SETTLE_SECONDS)
        self.say(f"drawing {self.args.out}")
        range_minutes = int(tl.total // 60) + 1
        render = await asyncio.create_subprocess_exec(
            sys.executable,
            str(RENDER),
            "--prometheus", self.prometheus_url,
            "--range", f"{range_minutes}m",
            "--job", JOB,
            "--out", str(self.args.out),
        )  # fmt: skip
        try:
            code = await render.wait()
        finally:
            if render.returncode is None:  # interrupted: it is ours to stop too
                render.kill()
                await render.wait()
        self.summary()
        if code != 0:
            print(f"render_dashboard.py exited with {code}", file=sys.stderr)
            return 1
        return 0

    def summary(self) -> None:
        tl = self.tally
        print("\nsummary:", flush=True)
        print(
            f"  runs started {tl.started}, ok {tl.ok}, failed {tl.failed}, skipped {tl.skipped} "
            f"(no terminal on purpose: {tl.no_terminal}); replays {tl.replays}, "
            f"ok {tl.replays_ok}, failed {tl.replays_failed}"
        )
        print("  per dialect: " + ", ".join(f"{d} {n}" for d, n in sorted(tl.dialects.items())))
        for incident in ("upstream", "redis", "outside incidents"):
            counts = tl.failures.get(incident)
            text = ", ".join(f"{why} {n}" for why, n in counts.most_common()) if counts else "-"
            print(f"  failures, {incident}: {text}")
        print(f"  picture: {self.args.out}", flush=True)


async def _main(args: argparse.Namespace, stack: Stack) -> int:
    async def body() -> int:
        async with aiohttp.ClientSession() as http:
            return await Scenario(args, stack, Timeline.scaled(args.minutes), http).run()

    return await supervised(stack, body, "dashboard scenario")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=14.0, help="length of the load")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PNG drawn")
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    args.out = args.out.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-scenario-"))
    stack = Stack(workdir)
    try:
        return asyncio.run(_main(args, stack))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 1
    finally:
        stack.stop()  # a backstop: _main stops the children itself
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
