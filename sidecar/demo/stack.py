"""``sse-sidecar quickstart`` (behind ``make run``): the whole stack on 127.0.0.1, and a tour.

It starts three child processes::

    redis-server            --port <redis_port>       files and log under <workdir>
    sse-sidecar demo-upstream --port <upstream_port>  a demo LLM service (sidecar/demo/upstream.py)
    sse-sidecar serve       --port <port>             the sidecar, proxying to the demo upstream
                            --admin-port <admin_port>

then sends streams through the sidecar, one run per dialect (three for Letta: ``normal``,
``error_then_done`` and ``dies``; OpenAI Chat Completions dying mid-stream, an OpenAI Responses
run, an Anthropic message that fails, a generic event stream), reads back what the sidecar stored
in Redis for each run, prints a summary and checks that every run ended the way DESIGN.md says.
Without ``--once`` it then prints commands to try by hand and keeps the stack running until Ctrl-C
or SIGTERM. The children are always stopped
on the way out, in reverse order: sidecar first (it drains into Redis), Redis last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from sidecar.errors import InvalidRunId, StoreError
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.sse import Event, SSEDecoder
from sidecar.store import RunMeta, RunStore
from sidecar.terminal import DONE_DATA

REDIS_MISSING = (
    "redis-server not found: run `make run` (it installs it) or apt-get install redis-server"
)
HOST = "127.0.0.1"
AGENT_ROUTE = "/v1/agents/agent-demo/messages/stream"
DEMO_ID = "quickstart"  # X-Demo-Id: the demo upstream's ids derive from it (resp_quickstart, ...)
RUN_ID_HEADER = "X-Sidecar-Run-Id"
STARTUP_TIMEOUT = 30.0  # seconds a child gets to become ready
SETTLE_TIMEOUT = 5.0  # seconds the writer gets to commit a finished run's meta
STOP_TIMEOUT = 15.0  # seconds a child gets to exit after SIGTERM, before SIGKILL
KEYS = Keys()


@dataclass(frozen=True, slots=True)
class Expected:
    dialect: str
    method: str
    path: str
    scenario: str
    status: str
    stop_reason: str
    forced_done: str | None
    # How the client's last event looks: (its event name, its data), None where either may be
    # anything; None for a run whose end has no bytes (generic).
    last: tuple[str | None, str | None] | None
    story: str


# The demo runs, what each must end as, and why (DESIGN.md, "The run and its terminal" and
# "Dialects"). Each run's name is <dialect>:<scenario>.
EXPECTED: dict[str, Expected] = {
    "letta:normal": Expected(
        "letta", "POST", AGENT_ROUTE, "normal", "completed", "end_turn", None, (None, DONE_DATA),
        "stop_reason end_turn, then the upstream's own [DONE]: completed, nothing forced.",
    ),
    "letta:error_then_done": Expected(
        "letta", "POST", AGENT_ROUTE, "error_then_done", "failed", "llm_api_error", None,
        (None, DONE_DATA),
        "stop_reason llm_api_error, event: error, then the upstream's own [DONE]. The tee keeps "
        "reading after the error event, so the run ends naturally: failed, no forced [DONE], "
        "no warning, no forced_done_total increment.",
    ),
    "letta:dies": Expected(
        "letta", "POST", AGENT_ROUTE, "dies", "failed", "error", "stream_incomplete",
        (None, DONE_DATA),
        "the upstream closed the stream with no terminal at all. The sidecar appended "
        "stop_reason error, an error event (error_type stream_incomplete) and [DONE], sent them "
        "to the client too, and counted forced_done_total{reason=stream_incomplete}.",
    ),
    "openai-chat:dies": Expected(
        "openai-chat", "POST", "/v1/chat/completions", "dies", "failed", "-",
        "stream_incomplete", (None, DONE_DATA),
        "Chat Completions chunks, then the upstream closed without finish_reason or [DONE]. The "
        'sidecar appended what an OpenAI client expects of a failed stream: an {"error": {"type":'
        ' "stream_incomplete", ...}} chunk (the openai SDK raises APIError on it) and [DONE].',
    ),
    "openai-responses:normal": Expected(
        "openai-responses", "POST", "/v1/responses", "normal", "completed", "completed", None,
        ("response.completed", None),
        "response.created ... response.output_text.delta ... response.completed: the Responses "
        "stream's own end (it has no [DONE]), so nothing is appended. Found by its id too: "
        f"GET /v1/responses/resp_{DEMO_ID}?stream=true&starting_after=N replays it from Redis.",
    ),
    "anthropic:error_then_done": Expected(
        "anthropic", "POST", "/v1/messages", "error_then_done", "failed", "-", None,
        ("error", None),
        "message_start, content deltas, then event: error (overloaded_error): a failed Anthropic "
        "message ends there, so this is a natural end: failed, its error stored, nothing forced.",
    ),
    "generic:normal": Expected(
        "generic", "GET", "/v1/events", "normal", "completed", "-", None, None,
        "plain text events, then a clean close: how a stream of unknown vocabulary ends. Nothing "
        "is appended; Redis keeps one more entry, the run's end, without bytes.",
    ),
}  # fmt: skip


class QuickstartError(Exception):
    """Something the user must fix or look at; the message says what."""


@dataclass(frozen=True, slots=True)
class Ports:
    redis: int
    upstream: int
    sidecar: int
    admin: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Ports:
        return cls(args.redis_port, args.upstream_port, args.port, args.admin_port)

    def check_free(self) -> None:
        named = {
            f"Redis (--redis-port {self.redis})": self.redis,
            f"demo upstream (--upstream-port {self.upstream})": self.upstream,
            f"sidecar traffic port (--port {self.sidecar})": self.sidecar,
            f"sidecar admin port (--admin-port {self.admin})": self.admin,
        }
        if len(set(named.values())) != len(named):
            raise QuickstartError(f"the four ports must differ: {', '.join(named)}")
        for name, port in named.items():
            if not _port_free(port):
                raise QuickstartError(
                    f"port {port} is already in use on {HOST}: it is the {name}. Stop whatever "
                    f"listens there (is another quickstart running?) or pick another port."
                )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a port whose old connections are in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def exited(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log}: {exc})"
        last = text.splitlines()[-lines:]
        return "\n".join("    " + line for line in last) if last else "    (empty)"

    def stop(self, *, kill: bool = False) -> None:
        """SIGKILL at once (``kill``), or SIGTERM and SIGKILL after ``STOP_TIMEOUT``."""
        if self.exited() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop within {STOP_TIMEOUT:.0f}s: killing it")
            self.proc.kill()
            self.proc.wait()

    def died(self, doing: str) -> QuickstartError:
        return QuickstartError(
            f"{self.name} exited with code {self.exited()} {doing}; "
            f"last lines of {self.log}:\n{self.tail()}"
        )


@dataclass
class Stack:
    """The child processes, started in order and stopped in reverse order."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Child:
        log = self.workdir / f"{name}.log"
        log.write_bytes(b"")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            # A session of its own: Ctrl-C reaches only us, and we stop the children in order.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self) -> None:
        if running := [child.name for child in reversed(self.children) if child.exited() is None]:
            print(f"stopping {', '.join(running)} ...", flush=True)
        while self.children:
            self.children.pop().stop()

    def replace(self, old: Child, new: Child) -> None:
        """``new`` (just started) takes ``old``'s place: the stop order stays the same."""
        self.children.remove(new)
        self.children[self.children.index(old)] = new

    def start_redis(self, server: str, port: int) -> Child:
        """``server`` (redis-server) on ``port``, no persistence, its files in the work dir."""
        return self.start(
            "redis",
            [
                server,
                "--bind", HOST,
                "--port", str(port),
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
            ],
        )  # fmt: skip

    def start_upstream(self, port: int) -> Child:
        """The demo LLM service on ``port``."""
        return self.start(
            "upstream",
            [sys.executable, "-m", "sidecar", "demo-upstream", "--host", HOST,
             "--port", str(port)],
        )  # fmt: skip


@dataclass
class RunReport:
    scenario: str
    run_id: str = "-"
    client_events: int = 0
    live: list[Event] = field(default_factory=list)
    replay_from: int = 0
    replayed: int = 0
    stored: int = 0
    meta: RunMeta | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return KEYS.stream(RunId(self.run_id)) if self.meta is not None else "-"


def quickstart(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.workdir).resolve())
    try:
        return asyncio.run(_quickstart(args, stack))
    except KeyboardInterrupt:  # Ctrl-C before our own signal handlers were in place
        print("\ninterrupted", file=sys.stderr)
        return 1
    finally:
        stack.stop()  # a backstop: _quickstart stops the children itself


async def _quickstart(args: argparse.Namespace, stack: Stack) -> int:
    return await supervised(stack, lambda: _tour(args, stack), "quickstart")


async def supervised(stack: Stack, body: Callable[[], Awaitable[int]], name: str) -> int:
    """``body``'s exit status, the children of ``stack`` stopped once it is over, whatever
    happened (also ``scripts/dashboard_scenario.py``'s). SIGINT and SIGTERM cancel this task;
    a ``QuickstartError`` is printed as ``name`` failing."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await body()
    except QuickstartError as exc:
        sys.stdout.flush()
        print(f"\n{name} failed: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        main.uncancel()
        print("\ninterrupted", file=sys.stderr)
        return 1
    finally:
        # Blocking on purpose: a second Ctrl-C only queues up until every child is stopped.
        stack.stop()


async def _tour(args: argparse.Namespace, stack: Stack) -> int:
    ports = Ports.from_args(args)
    redis = RunStore(f"redis://{HOST}:{ports.redis}/0", KEYS, max_connections=2, timeout=2.0)
    try:
        async with aiohttp.ClientSession() as http:
            await _start(stack, ports, http, redis)
            reports = [await _drive(http, redis, ports, name) for name in EXPECTED]
            for report in reports:
                await _replay(http, ports, report)
            ok = _print_summary(reports, await _scrape_metrics(http, ports))
    finally:
        await redis.aclose()
    if args.once:
        return 0 if ok else 1
    _print_try_it(ports, reports)
    try:
        await _watch(stack)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        print()
    return 0 if ok else 1


async def _start(
    stack: Stack,
    ports: Ports,
    http: aiohttp.ClientSession,
    redis: RunStore,
) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise QuickstartError(REDIS_MISSING)
    ports.check_free()
    stack.workdir.mkdir(parents=True, exist_ok=True)
    print("sse-sidecar quickstart: Redis, a demo LLM service and the sidecar, on 127.0.0.1\n")

    redis_child = stack.start_redis(redis_server, ports.redis)
    await until_ready(redis_child, f"redis://{HOST}:{ports.redis}", redis_ping(redis))
    _started(redis_child, f"redis://{HOST}:{ports.redis}/0")

    upstream_url = f"http://{HOST}:{ports.upstream}"
    upstream = stack.start_upstream(ports.upstream)
    health = f"{upstream_url}/v1/health"
    await until_ready(upstream, health, http_ok(http, health))
    _started(upstream, upstream_url, "the demo LLM service")

    sidecar = stack.start(
        "sidecar",
        [
            sys.executable, "-m", "sidecar", "serve",
            "--upstream-url", upstream_url,
            "--redis-url", f"redis://{HOST}:{ports.redis}/0",
            "--host", HOST,
            "--port", str(ports.sidecar),
            "--admin-port", str(ports.admin),
            "--log-format", "text",
            "--drain-seconds", "2",
        ],
    )  # fmt: skip
    readyz = f"http://{HOST}:{ports.admin}/readyz"
    await until_ready(sidecar, readyz, http_ok(http, readyz))
    _started(sidecar, f"http://{HOST}:{ports.sidecar}", f"admin http://{HOST}:{ports.admin}")


def _started(child: Child, url: str, note: str = "") -> None:
    note = f"  ({note})" if note else ""
    print(f"  {child.name:<9} {url:<28} pid {child.proc.pid:<8} log {child.log}{note}")


Probe = Callable[[], Awaitable[str | None]]


def redis_ping(redis: RunStore) -> Probe:
    async def probe() -> str | None:
        try:
            await redis.probe()
        except StoreError as exc:
            return str(exc)
        return None

    return probe


def http_ok(http: aiohttp.ClientSession, url: str) -> Probe:
    async def probe() -> str | None:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return None
                return f"HTTP {resp.status}: {(await resp.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return str(exc) or type(exc).__name__

    return probe


async def until_ready(child: Child, what: str, probe: Probe) -> None:
    """Poll ``probe`` (None means ready) until it passes, the child dies or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    while True:
        if child.exited() is not None:
            raise child.died("while starting")
        problem = await probe()
        if problem is None:
            return
        if loop.time() > deadline:
            raise QuickstartError(
                f"{child.name} is not ready after {STARTUP_TIMEOUT:.0f}s ({what}: {problem}); "
                f"last lines of {child.log}:\n{child.tail()}"
            )
        await asyncio.sleep(0.1)


async def _drive(
    http: aiohttp.ClientSession, redis: RunStore, ports: Ports, name: str
) -> RunReport:
    """One stream through the sidecar, read to the end; then what Redis holds for it."""
    report = RunReport(name)
    run = EXPECTED[name]
    url = f"http://{HOST}:{ports.sidecar}{run.path}"
    body = {"scenario": run.scenario, "model": "demo-llm-1", "stream": True}
    last: Event | None = None
    try:
        async with http.request(
            run.method,
            url,
            json=body if run.method == "POST" else None,
            params={"scenario": run.scenario},
            headers={"X-Demo-Id": DEMO_ID},
        ) as resp:
            if resp.status != 200:
                report.problems.append(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                return report
            raw_id = resp.headers.get(RUN_ID_HEADER)
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                for item in decoder.feed(chunk):
                    if isinstance(item, Event) and item.data is not None:
                        report.client_events += 1
                        report.live.append(item)
                        last = item
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.problems.append(f"the stream broke: {type(exc).__name__}: {exc}")
        return report
    if raw_id is None:
        report.problems.append(f"no {RUN_ID_HEADER} response header")
        return report
    try:
        run_id = validate_run_id(raw_id)
    except InvalidRunId as exc:
        report.problems.append(f"bad {RUN_ID_HEADER} {raw_id!r}: {exc}")
        return report
    report.run_id = run_id
    report.meta = await _settled_meta(redis, run_id)
    report.stored = await redis.length(run_id)
    if report.meta is not None and report.meta.silent_end:
        report.stored -= 1  # the run's end, stored without bytes, is not an event
    _check(report, last)
    return report


async def _replay(http: aiohttp.ClientSession, ports: Ports, report: RunReport) -> None:
    """Resume the finished run a few events before its end, as a reconnecting client would."""
    if report.meta is None or not report.live:
        return
    report.replay_from = max(0, len(report.live) - 3)
    url = (
        f"http://{HOST}:{ports.sidecar}/sidecar/v1/runs/{report.run_id}/stream"
        f"?starting_after={report.replay_from}"
    )
    async with http.get(url) as resp:
        body = await resp.read()
        if resp.status != 200:
            report.problems.append(f"replay answered HTTP {resp.status}: {body[:200]!r}")
            return
    replayed = [i for i in SSEDecoder().feed(body) if isinstance(i, Event)]
    report.replayed = len(replayed)
    if replayed != report.live[report.replay_from :]:
        report.problems.append(
            f"replay from seq {report.replay_from} differs from what the live client received"
        )


async def _settled_meta(redis: RunStore, run_id: RunId) -> RunMeta | None:
    """The run's meta once it is no longer ``running`` (the writer commits asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        meta = await redis.meta(run_id)
        if (meta is not None and meta.status != "running") or loop.time() > deadline:
            return meta
        await asyncio.sleep(0.05)


def _check(report: RunReport, last: Event | None) -> None:
    expected = EXPECTED[report.scenario]
    meta = report.meta
    problems = report.problems
    if meta is None:
        problems.append(f"no meta hash {KEYS.meta(RunId(report.run_id))} in Redis")
        return
    if meta.dialect != expected.dialect:
        problems.append(f"dialect is {meta.dialect!r}, expected {expected.dialect!r}")
    if meta.status != expected.status:
        problems.append(f"status is {meta.status!r}, expected {expected.status!r}")
    if (meta.stop_reason or "-") != expected.stop_reason:
        problems.append(f"stop_reason is {meta.stop_reason!r}, expected {expected.stop_reason!r}")
    if meta.forced_done != expected.forced_done:
        want = expected.forced_done or "none"
        problems.append(f"forced_done is {meta.forced_done or 'none'!r}, expected {want!r}")
    if report.stored != report.client_events:
        problems.append(
            f"the client got {report.client_events} events but Redis stores {report.stored} "
            "(a replay must return exactly what the live client got)"
        )
    if meta.last_event_seq != report.stored:
        problems.append(f"meta last_seq is {meta.last_seq}, the stream holds {report.stored}")
    if expected.last is not None:
        event, data = expected.last
        if last is None or last.event != event or (data is not None and last.data != data):
            got = "nothing" if last is None else f"event {last.event!r} {last.data!r}"[:100]
            problems.append(f"the client's last event is {got}, expected {event!r} {data!r}")


async def _scrape_metrics(http: aiohttp.ClientSession, ports: Ports) -> list[str]:
    wanted = ("sse_sidecar_forced_done_total", "sse_sidecar_stream_transitions_total")
    async with http.get(f"http://{HOST}:{ports.admin}/metrics") as resp:
        text = await resp.text()
    # Every known label value is exported from 0; show the ones these runs moved.
    return [
        line for line in text.splitlines() if line.startswith(wanted) and not line.endswith(" 0.0")
    ]


def _print_summary(reports: list[RunReport], metric_lines: list[str]) -> bool:
    print("\nOne run per dialect through the sidecar (dialect: auto), named <dialect>:<scenario>\n")
    header = (
        "run", "run id", "client", "stored", "status", "stop_reason", "forced_done",
        "redis key",
    )  # fmt: skip
    rows = [header]
    for r in reports:
        meta = r.meta
        rows.append(
            (
                r.scenario,
                r.run_id,
                str(r.client_events),
                str(r.stored),
                meta.status if meta else "-",
                (meta.stop_reason or "-") if meta else "-",
                (meta.forced_done or "-") if meta else "-",
                r.key,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(
        "\n  client = events the client received live; stored = events in the run's Redis stream"
        "\n  (XLEN, minus a generic run's end without bytes). They must be equal: a replay"
        "\n  returns exactly what the live client got, synthesized terminal events included.\n"
    )
    print("What happened:")
    for r in reports:
        story = textwrap.wrap(EXPECTED[r.scenario].story, 72)
        print(f"  {r.scenario}\n    " + "\n    ".join(story))
    print("\nReplay (GET /sidecar/v1/runs/{run_id}/stream?starting_after=N, as after a dropped")
    print("connection): each run resumed 3 events before its end:")
    for r in reports:
        same = "identical to the live events" if not r.problems else "see below"
        print(f"  {r.scenario:<26}from seq {r.replay_from}: {r.replayed} events, {same}")
    print("\nMetrics (admin port, /metrics):")
    for line in metric_lines or ["(none)"]:
        print(f"  {line}")
    bad = [r for r in reports if r.problems]
    if not bad:
        print("\nOK: every run ended as DESIGN.md says it must.")
        return True
    print("\n" + "!" * 78)
    print("UNEXPECTED: the sidecar did not behave as DESIGN.md says:")
    for r in bad:
        for problem in r.problems:
            print(f"  {r.scenario} ({r.run_id}): {problem}")
    print("!" * 78)
    return False


def _print_try_it(ports: Ports, reports: list[RunReport]) -> None:
    by_scenario = {r.scenario: r for r in reports}
    failed = by_scenario["letta:dies"].run_id
    proxy = f"http://{HOST}:{ports.sidecar}"
    stream = f"curl -N -X POST {proxy}{AGENT_ROUTE} -H 'Content-Type: application/json'"
    print(
        f"""
Try it yourself (the stack keeps running; Ctrl-C stops it):

  # stream through the sidecar (scenarios: normal, error_then_done, dies, error_no_done,
  # stop_no_done, reset; optional "tokens" and "delay_ms")
  {stream} -d '{{"scenario":"normal"}}'

  # the same with the response headers: X-Sidecar-Run-Id is the run id
  curl -i {stream[5:]} -d '{{"scenario":"dies"}}'

  # the other protocols the demo speaks (dialect auto detects each); scenarios: normal,
  # error_then_done, dies, reset (and error_no_done, stop_no_done where the protocol has them)
  curl -N {proxy}/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{{"model":"demo-llm-1","stream":true,"messages":[],"scenario":"dies"}}'
  curl -N {proxy}/v1/messages -H 'Content-Type: application/json' \
    -d '{{"model":"demo-llm-1","max_tokens":64,"messages":[],"scenario":"normal"}}'
  curl -N '{proxy}/v1/events?scenario=reset'

  # an OpenAI Responses stream, then its resume by response id and sequence_number (served
  # from Redis: the sidecar holds the run); the run's status by the response id too
  curl -N {proxy}/v1/responses -H 'X-Demo-Id: mine' -H 'Content-Type: application/json' \
    -d '{{"model":"demo-llm-1","input":"hi","stream":true}}'
  curl -N '{proxy}/v1/responses/resp_mine?stream=true&starting_after=12'
  curl {proxy}/sidecar/v1/runs/resp_{DEMO_ID}

  # non-SSE traffic passes through untouched
  curl -X POST '{proxy}/v1/echo?hello=world' -H 'Content-Type: application/json' -d '{{"hi":1}}'

  # replay the "dies" run from seq 10 (or with Last-Event-ID, or Letta's POST form), its status
  curl -N '{proxy}/sidecar/v1/runs/{failed}/stream?starting_after=10'
  curl -N -H 'Last-Event-ID: 10' {proxy}/sidecar/v1/runs/{failed}/stream
  curl -N -X POST {proxy}/v1/runs/{failed}/stream -H 'Content-Type: application/json' \\
    -d '{{"starting_after": 10}}'
  curl {proxy}/sidecar/v1/runs/{failed}

  # follow a slow run live from another terminal while it streams (cancel it from a third)
  {stream} -H 'X-Run-Id: run-slow' -d '{{"scenario":"normal","tokens":200,"delay_ms":100}}'
  curl -N {proxy}/sidecar/v1/runs/run-slow/stream
  curl -X POST {proxy}/sidecar/v1/runs/run-slow/cancel

  # what the sidecar stored for the "dies" run: its events (forced terminal at the end), its meta
  redis-cli -p {ports.redis} XRANGE '{KEYS.stream(RunId(failed))}' - +
  redis-cli -p {ports.redis} HGETALL '{KEYS.meta(RunId(failed))}'

  # the metrics
  curl -s http://{HOST}:{ports.admin}/metrics | grep sse_sidecar_
""",
        flush=True,
    )


async def _watch(stack: Stack) -> None:
    """Wait for Ctrl-C / SIGTERM (they cancel us); fail if a child dies meanwhile."""
    while True:
        for child in stack.children:
            if child.exited() is not None:
                raise child.died("unexpectedly")
        await asyncio.sleep(0.5)
