"""The fault suite's parts: Redis as a process to kill and freeze, sidecars as CLI processes,
streaming traffic with a record of what each side saw, and the per-run audit.

Every case looks at a run from four places and compares them event by event:

- what the upstream sent (the test's aiohttp upstream records it),
- what the live client got (real HTTP clients, bytes as received),
- what Redis holds (``XRANGE`` and the meta hash, read directly, not through the sidecar),
- what a replay from 0 returns (walked through the sidecar's replay API, following each
  ``410`` or in-stream loss notice to the next available event).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import redis.asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.keys import Keys, RunId
from tests.cli import CliSidecar, start_cli
from tests.conftest import RedisServer, Upstream
from tests.functional.helpers import DONE, eventually, stop, token

PATH = "/v1/agents/fault/messages/stream"
KEY_HEADER = "X-Fault-Key"
KEYS = Keys()


# -- Redis, as a process ---------------------------------------------------------------------


class FaultRedis(RedisServer):
    """A redis-server child (AOF with fsync always, or no persistence at all) that a case may
    SIGKILL, SIGSTOP/SIGCONT, or restart on the same port."""

    paused = False

    @property
    def pid(self) -> int:
        assert self.proc is not None, "redis-server is not running"
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.resume()
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        self.resume()
        super().stop()


# -- sidecars, as CLI processes --------------------------------------------------------------


class Scrape:
    """One /metrics scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """Non-zero samples of ``name`` by the value of one label."""
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples.items()
            if sample == name and value and label in dict(labels)
        }


@dataclass
class SidecarProcess(CliSidecar):
    peak_rss_mb: float = 0.0  # VmHWM, read by ``memory()`` while the process lives

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def memory(self) -> tuple[float, float]:
        """(RSS, peak RSS) in MiB, from /proc; the peak is also kept for after the process."""
        fields: dict[str, float] = {}
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
        self.peak_rss_mb = max(self.peak_rss_mb, fields["VmHWM"])
        return fields["VmRSS"], fields["VmHWM"]

    async def scrape(self, http: aiohttp.ClientSession) -> Scrape:
        async with http.get(self.admin_url + "/metrics") as resp:
            assert resp.status == 200
            return Scrape(await resp.text())

    async def settled(
        self, http: aiohttp.ClientSession, timeout: float = 30.0, *, runs_too: bool = True
    ) -> Scrape:
        """Wait until the writer holds nothing (and, with ``runs_too``, no run is active);
        the last scrape."""
        last: list[Scrape] = []

        async def quiet() -> bool:
            scrape = await self.scrape(http)
            last[:] = [scrape]
            return scrape.value("sse_sidecar_writer_pending_events") == 0 and (
                not runs_too or scrape.value("sse_sidecar_runs_active") == 0
            )

        # Another process's state has no event to await.
        await eventually(quiet, timeout=timeout, interval=0.1, what=f"sidecar {self.name} idle")
        return last[0]

    def signal(self, sig: signal.Signals) -> None:
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.memory()
        self.proc.send_signal(sig)

    async def exited(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


SidecarFactory = Callable[..., Awaitable[SidecarProcess]]


async def start_sidecar(
    name: str,
    *,
    upstream: Upstream,
    redis_url: str,
    http: aiohttp.ClientSession,
    workdir: Path,
    ready: bool = True,
    env: dict[str, str] | None = None,
    **flags: Any,
) -> SidecarProcess:
    """``python -m sidecar serve`` with these flags; waits for /readyz (or /healthz)."""
    return await start_cli(
        SidecarProcess,
        name,
        upstream_url=upstream.url,
        redis_url=redis_url,
        http=http,
        workdir=workdir,
        probe="/readyz" if ready else "/healthz",
        env=env,
        **flags,
    )


# -- traffic ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Run:
    """One streamed run: what the upstream sent and what its live client got."""

    key: str
    interval: float
    min_events: int
    max_events: int | None
    quiet_after: int | None
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[str] = field(default_factory=list)  # labels (see ``label``) of what was sent
    upstream_end: str = ""  # "done" once [DONE] was written, "cut" when the sidecar vanished
    status: int = 0
    run_id: str = ""
    body: bytes = b""
    client_end: str = ""  # "eof", "cut", or the error
    t_start: float = 0.0
    t_headers: float | None = None
    t_first: float | None = None
    task: asyncio.Task[None] | None = None

    @property
    def first_byte_seconds(self) -> float:
        assert self.t_first is not None, f"{self.key}: no byte came"
        return self.t_first - self.t_start

    @property
    def headers_seconds(self) -> float:
        assert self.t_headers is not None, f"{self.key}: no response"
        return self.t_headers - self.t_start

    @property
    def live(self) -> dict[int, bytes]:
        return numbered(split_raw(self.body))

    @property
    def live_events(self) -> int:
        return self.body.count(b"\n\n") - self.body.count(b"\n\n:")


def label(raw: bytes) -> str:
    """What an event says, comparable between the upstream and every client: a token's
    content, ``stop:<reason>``, ``error:<error_type>``, or ``[DONE]``."""
    data = "\n".join(line[6:] for line in raw.decode().split("\n") if line.startswith("data: "))
    if data == "[DONE]":
        return data
    payload = json.loads(data)
    if payload.get("message_type") == "stop_reason":
        return f"stop:{payload['stop_reason']}"
    if payload.get("message_type") == "error_message":
        return f"error:{payload['error_type']}"
    return str(payload["content"])


_ID = re.compile(rb"^id: (\d+)$", re.M)


def split_raw(body: bytes) -> list[bytes]:
    """The events of a body the sidecar wrote (LF ends), comments left out (each is a line of
    its own); a cut last part (no blank line after it) is left out too."""
    lines = body.splitlines(keepends=True)
    parts = b"".join(line for line in lines if not line.startswith(b":")).split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1] if p]


def seq_of(raw: bytes) -> int | None:
    found = _ID.search(raw)
    return int(found.group(1)) if found else None


def numbered(events: Iterable[bytes]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for raw in events:
        seq = seq_of(raw)
        assert seq is not None, f"an unnumbered event: {raw!r}"
        assert seq not in out, f"seq {seq} twice"
        out[seq] = raw
    return out


def unbounded_session() -> aiohttp.ClientSession:
    """A client session for long-lived streams: no connection limit (aiohttp's default of 100
    would queue the 101st stream behind the others) and no total timeout (its default of 300 s
    would cut a long case's streams)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )


class HasUrl(Protocol):
    """Where traffic goes: a sidecar, or the upstream itself (a baseline without the sidecar)."""

    @property
    def url(self) -> str: ...


class Traffic:
    """Runs streamed through sidecars: the upstream's side (on ``PATH`` of the test's real
    aiohttp upstream) and the live clients' side (one real HTTP client per run)."""

    def __init__(self, upstream: Upstream, payload_bytes: int = 64) -> None:
        self.runs: dict[str, Run] = {}
        self.finishing = asyncio.Event()
        self.pad = "x" * payload_bytes
        self._session = unbounded_session()
        upstream.raw(PATH, self._upstream)

    async def aclose(self) -> None:
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._session.close()

    def start(
        self,
        sidecar: HasUrl,
        n: int,
        *,
        prefix: str = "r",
        interval: float = 0.05,
        min_events: int = 1,
        max_events: int | None = None,
        quiet_after: int | None = None,
        chosen_ids: bool = False,
    ) -> list[Run]:
        """Start ``n`` runs through ``sidecar``: each sends a token every ``interval`` s until
        ``finish()`` (and at least ``min_events``) or ``max_events``, then stop + [DONE]; a
        quiet run stops sending after ``quiet_after`` tokens until its ``hold`` is set."""
        runs = []
        for i in range(n):
            key = f"{prefix}{len(self.runs)}-{i}"
            run = Run(key, interval, min_events, max_events, quiet_after)
            self.runs[key] = run
            run.task = asyncio.create_task(self._client(sidecar, run, chosen_ids))
            runs.append(run)
        return runs

    def finish(self) -> None:
        self.finishing.set()

    async def ended(self, runs: Sequence[Run], timeout: float) -> None:
        tasks = [r.task for r in runs if r.task is not None]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        assert not pending, f"{len(pending)} of {len(runs)} live clients still reading"
        for task in done:
            task.result()

    async def received(
        self, runs: Sequence[Run], events: int, timeout: float = 30.0, *, more: bool = True
    ) -> None:
        """Wait until every run's live client got ``events`` more events (or, with
        ``more=False``, at least ``events`` in all)."""
        targets = {run: run.live_events * more + events for run in runs}

        async def all_there() -> bool:
            return all(run.live_events >= n for run, n in targets.items())

        await eventually(all_there, timeout=timeout, what=f"{events} more live events per run")

    async def _client(self, sidecar: HasUrl, run: Run, chosen: bool) -> None:
        headers = {KEY_HEADER: run.key}
        if chosen:
            headers["X-Run-Id"] = run.key
        run.t_start = time.perf_counter()
        try:
            async with self._session.post(sidecar.url + PATH, json={}, headers=headers) as resp:
                run.t_headers = time.perf_counter()
                run.status = resp.status
                run.run_id = resp.headers.get("X-Sidecar-Run-Id", "")
                async for chunk in resp.content.iter_any():
                    if run.t_first is None:
                        run.t_first = time.perf_counter()
                    run.body += chunk
            run.client_end = "eof"
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            run.client_end = f"cut ({type(exc).__name__})"

    async def _upstream(self, request: web.Request) -> web.StreamResponse:
        run = self.runs[request.headers[KEY_HEADER]]
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        try:
            i = 0
            while run.max_events is None or i < run.max_events:
                if run.quiet_after is not None and i == run.quiet_after:
                    await run.hold.wait()
                if self.finishing.is_set() and i >= run.min_events:
                    break
                content = f"{run.key}:{i}:{self.pad}"
                await resp.write(token(content))
                run.sent.append(content)
                i += 1
                await asyncio.sleep(run.interval)
            await resp.write(stop("end_turn"))
            run.sent.append("stop:end_turn")
            await resp.write(DONE)
            run.sent.append("[DONE]")
            await resp.write_eof()
            run.upstream_end = "done"
        except (ConnectionError, asyncio.CancelledError):
            run.upstream_end = "cut"
            raise
        return resp


# -- what Redis holds, and what a replay returns ---------------------------------------------


async def in_redis(client: redis.asyncio.Redis, runs: Sequence[Run], timeout: float = 30.0) -> None:
    """Wait until Redis holds every run (its live client may be ahead of the writer)."""

    async def all_there() -> bool:
        found = await asyncio.gather(*(client.exists(KEYS.meta(RunId(r.run_id))) for r in runs))
        return all(found)

    await eventually(all_there, timeout=timeout, what="every run in Redis")


@dataclass
class Stored:
    entries: dict[int, bytes]  # seq -> data, as XRANGE returns them
    complete: list[int]  # seqs of entries marked complete
    meta: dict[str, str]


async def stored(client: redis.asyncio.Redis, run_id: str) -> Stored:
    rows: Any = await client.xrange(KEYS.stream(RunId(run_id)))
    entries: dict[int, bytes] = {}
    complete: list[int] = []
    for entry_id, fields in rows:
        seq = int(entry_id.decode().split("-")[0])
        assert int(fields[b"seq_id"]) == seq
        entries[seq] = fields[b"data"]
        if fields[b"complete"] == b"true":
            complete.append(seq)
    raw: Any = await client.hgetall(KEYS.meta(RunId(run_id)))
    return Stored(entries, complete, {k.decode(): v.decode() for k, v in raw.items()})


@dataclass
class Replayed:
    events: dict[int, bytes] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)  # 410 bodies and loss notices
    answers: list[int] = field(default_factory=list)  # HTTP status of each request
    cuts: int = 0  # responses that ended without a complete entry


async def replay(http: aiohttp.ClientSession, sidecar: SidecarProcess, run_id: str) -> Replayed:
    """A replay from 0 to the run's end, as a client that resumes would do it: each 410 and
    each in-stream loss notice (an unnumbered ``event: error``) is recorded, and the walk goes
    on after the loss it names."""
    out = Replayed()
    cursor = 0
    for _ in range(50):
        headers = {"Last-Event-ID": str(cursor)}
        async with http.get(sidecar.run_url(run_id, "/stream"), headers=headers) as resp:
            out.answers.append(resp.status)
            if resp.status == 410:
                error = (await resp.json())["error"]
                error["error_type"] = error.pop("type")  # named as in the in-stream notice
                out.losses.append(error)
                cursor = _resume_after(error)
                continue
            if resp.status != 200:
                return out
            body = b""
            try:
                async for chunk in resp.content.iter_any():
                    body += chunk
                cut = False
            except aiohttp.ClientPayloadError:
                cut = True
        complete = False
        for raw in split_raw(body):
            seq = seq_of(raw)
            if seq is None:
                notice = json.loads(raw.split(b"data: ", 1)[1])
                out.losses.append(notice)
                cursor = _resume_after(notice)
                continue
            assert seq == cursor + 1, f"replay of {run_id}: seq {seq} after {cursor}"
            out.events[seq] = raw
            cursor = seq
            complete = label(raw) == "[DONE]"
        out.cuts += cut or not complete
        if complete:
            return out
    raise AssertionError(f"replay of {run_id} did not reach its end: {out}")


def _resume_after(error: dict[str, Any]) -> int:
    if error.get("resume_after") is not None:
        return int(error["resume_after"])
    first = error.get("first_available_seq")
    assert first is not None, f"a loss with nowhere to resume: {error}"
    return int(first) - 1


# -- the per-run verdict ---------------------------------------------------------------------


@dataclass
class Audit:
    run: Run
    stored: Stored
    replayed: Replayed

    @property
    def live(self) -> dict[int, bytes]:
        return self.run.live


async def audit(
    runs: Sequence[Run],
    client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    reader: SidecarProcess,
) -> list[Audit]:
    out = []
    for run in runs:
        assert run.status == 200, f"{run.key}: answered {run.status}"
        assert run.run_id
        out.append(
            Audit(run, await stored(client, run.run_id), await replay(http, reader, run.run_id))
        )
    return out


def labels(events: dict[int, bytes]) -> list[str]:
    return [label(events[s]) for s in sorted(events)]


def check_terminal(events: dict[int, bytes], what: str) -> None:
    """Exactly one [DONE], and it is the last event; seqs 1..n without a gap."""
    seqs = sorted(events)
    assert seqs == list(range(1, len(seqs) + 1)), f"{what}: seqs {seqs[:3]}..{seqs[-3:]} skip"
    said = labels(events)
    assert said.count("[DONE]") == 1, f"{what}: terminals {said[-4:]}"
    assert said[-1] == "[DONE]", f"{what}: terminals {said[-4:]}"


def check_live(a: Audit, *, synthesized: Sequence[str] = ()) -> None:
    """The live client got every event the upstream sent, in order, once, then what the
    sidecar had to add, and one terminal."""
    run = a.run
    assert run.client_end == "eof", f"{run.key}: live client {run.client_end}"
    check_terminal(a.live, f"{run.key} live")
    got = labels(a.live)
    if synthesized:
        assert got == run.sent[: len(got) - len(synthesized)] + list(synthesized), run.key
    else:
        assert got == run.sent, f"{run.key}: live {got[-3:]} vs sent {run.sent[-3:]}"


def check_whole(
    a: Audit,
    *,
    status: str = "completed",
    forced: str | None = None,
    synthesized: Sequence[str] = (),
) -> None:
    """Nothing lost, nothing duplicated: upstream = live = Redis = replay, one terminal."""
    run = a.run
    check_live(a, synthesized=synthesized)
    assert a.stored.entries == a.live, f"{run.key}: stored differs from live"
    assert a.stored.complete == [max(a.live)], f"{run.key}: complete flags {a.stored.complete}"
    assert a.replayed.events == a.live, f"{run.key}: replay differs from live"
    assert not a.replayed.losses, f"{run.key}: replay reported {a.replayed.losses}"
    meta = a.stored.meta
    assert (meta["status"], meta.get("forced_done") or None) == (status, forced), meta
    assert meta["last_seq"] == str(max(a.live))
    assert "incomplete" not in meta, meta
    assert "lost_ranges" not in meta, meta


def marked_losses(meta: dict[str, str]) -> set[int]:
    """Every seq the meta says was lost (history Redis lost, and the writer's holes)."""
    lost = set(range(1, int(meta.get("history_lost_through", "0")) + 1))
    for field_name in ("lost_ranges", "history_lost_ranges"):
        for part in filter(None, meta.get(field_name, "").split(",")):
            first, last = part.split("-")
            lost.update(range(int(first), int(last) + 1))
    return lost


def check_marked(a: Audit, *, kinds: set[str], status: str = "completed") -> set[int]:
    """Loss that is never silent: the live client got everything; Redis holds the rest exactly
    and its meta names every missing seq; the replay returns exactly what is stored and names
    each loss with its own error type (one of ``kinds``). Returns the lost seqs."""
    run = a.run
    check_live(a)
    entries, meta = a.stored.entries, a.stored.meta
    for seq, data in entries.items():
        assert data == a.live[seq], f"{run.key}: stored seq {seq} differs from live"
    last = max(a.live)
    assert a.stored.complete == [last], f"{run.key}: terminal not stored"
    missing = set(a.live) - set(entries)
    assert missing == marked_losses(meta), f"{run.key}: missing {sorted(missing)[:5]}.. {meta}"
    assert meta["status"] == status, meta
    assert not meta.get("forced_done"), meta
    assert a.replayed.events == entries, f"{run.key}: the replay differs from Redis"
    said = {loss["error_type"] for loss in a.replayed.losses}
    assert said <= kinds, f"{run.key}: replay said {said}"
    assert bool(missing) == bool(a.replayed.losses), f"{run.key}: {a.replayed.losses}"
    if missing:
        # The meta's word for the loss: the writer's overflow, or history Redis lost.
        assert meta.get("incomplete") in {INCOMPLETE[kind] for kind in kinds}, meta
    return missing


INCOMPLETE = {"events_lost": "overflow", "history_lost": "history_lost"}


def bounded_rss(*sidecars: SidecarProcess, mib: float = 150.0) -> list[float]:
    """Each sidecar's peak RSS (VmHWM; for a process that is gone, as last read), in MiB, and
    that it stayed under ``mib`` (an idle sidecar holds about 60)."""
    peaks = [round(sc.memory()[1] if sc.alive else sc.peak_rss_mb, 1) for sc in sidecars]
    assert max(peaks) < mib, f"peak RSS {peaks} MiB, bound {mib}"
    return peaks


# -- the measured figures, for README's fault table -----------------------------------------


def record(case: str, **figures: Any) -> None:
    """Write one case's measured figures (when ``FAULTS_REPORT_DIR`` is set: make test-faults)."""
    directory = os.environ.get("FAULTS_REPORT_DIR")
    line = json.dumps({"case": case, **figures}, sort_keys=True)
    print(f"\nFAULTS {line}")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{case}.json").write_text(line + "\n")


def totals(audits: Sequence[Audit]) -> dict[str, int]:
    return {
        "runs": len(audits),
        "sent": sum(len(a.run.sent) for a in audits),
        "live": sum(len(a.live) for a in audits),
        "stored": sum(len(a.stored.entries) for a in audits),
        "replayed": sum(len(a.replayed.events) for a in audits),
    }


def forced_reasons(audits: Sequence[Audit]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in audits:
        reason = a.stored.meta.get("forced_done") or "natural"
        out[reason] = out.get(reason, 0) + 1
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Poller:
    """Status calls against runs, every 0.1 s, while a fault comes and goes (``async with``)."""

    def __init__(
        self, http: aiohttp.ClientSession, sidecar: SidecarProcess, run_ids: Sequence[str]
    ) -> None:
        self.answers: list[tuple[float, int, str]] = []  # (sent at, HTTP status, forced_done)
        self._http = http
        self._sidecar = sidecar
        self._run_ids = list(run_ids)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Poller:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _loop(self) -> None:
        while True:
            for run_id in self._run_ids:
                sent = time.monotonic()
                try:
                    async with self._http.get(self._sidecar.run_url(run_id)) as resp:
                        body = await resp.json() if resp.status == 200 else {}
                    self.answers.append((sent, resp.status, str(body.get("forced_done"))))
                except aiohttp.ClientError as exc:
                    self.answers.append((sent, 0, type(exc).__name__))
            await asyncio.sleep(0.1)


START_ATTEMPTS = 5


class Readers:
    """Replay readers from 0 that follow runs live (one real HTTP client each; ``async with``
    stops what is still reading)."""

    def __init__(self, sidecar: SidecarProcess, run_ids: Sequence[str]) -> None:
        self.bodies: dict[str, bytes] = dict.fromkeys(run_ids, b"")
        self.ends: dict[str, str] = {}
        self.start_503 = 0  # requests refused with 503 before their stream began, then retried
        self._http = unbounded_session()
        self._sidecar = sidecar
        self._started: set[str] = set()
        self._all_started = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read(run_id)) for run_id in run_ids]

    async def reading(self, timeout: float = 30.0) -> None:
        """Wait until every reader has its first bytes (so the stream is open)."""
        started = asyncio.ensure_future(self._all_started.wait())
        await asyncio.wait([started, *self._tasks], timeout=timeout, return_when="FIRST_COMPLETED")
        started.cancel()
        assert self._all_started.is_set(), f"readers not reading: {self.ends}"

    async def _read(self, run_id: str) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            if await self._attempt(run_id) or attempt == START_ATTEMPTS:
                return
            # 503 before the stream began: the sidecar's Redis pool was busy past its wait
            # (redis_timeout_seconds); a client tries again, as this one does, counted.
            self.start_503 += 1
            await asyncio.sleep(0.2 * attempt)

    async def _attempt(self, run_id: str) -> bool:
        """One request; False if it was refused with a 503 before any byte (worth retrying)."""
        try:
            async with self._http.get(self._sidecar.run_url(run_id, "/stream")) as resp:
                if resp.status != 200:
                    self.ends[run_id] = f"status {resp.status}: {(await resp.text())[:300]}"
                    return resp.status != 503
                async for chunk in resp.content.iter_any():
                    self.bodies[run_id] += chunk
                    if run_id not in self._started:
                        self._started.add(run_id)
                        if len(self._started) == len(self.bodies):
                            self._all_started.set()
            self.ends[run_id] = "eof"
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            self.ends[run_id] = f"cut ({type(exc).__name__})"
        return True

    async def finished(self, timeout: float) -> None:
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        assert not pending, f"{len(pending)} replay readers still reading"

    async def __aenter__(self) -> Readers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks)
        await self._http.close()

    def events(self, run_id: str) -> dict[int, bytes]:
        return numbered(split_raw(self.bodies[run_id]))
