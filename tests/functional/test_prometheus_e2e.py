"""The shipped dashboard and rules against a real Prometheus scraping real sidecars.

A Prometheus (the Debian package's binary, scrape and evaluation every second, the shipped
recording and alert rules loaded, the targets labelled like Kubernetes' with cluster, namespace
and pod) scrapes the admin port of a sidecar that tees a mix of streams from a real upstream into
a real Redis: normal runs, an error followed by the upstream's [DONE], streams that die (clean
EOF, connection reset), a stop reason without [DONE], a run longer than the length cap, live and
historical replays, a 410, a 404, a run whose producer died, and a 5xx. Before any of it, the
replay panels read 0, not "No data". Then every dashboard query and every recording rule is
evaluated through Prometheus' HTTP API, and each must return data: a panel that can never show
anything is a bug. The same Prometheus also shows that it loaded the rules as written, that they
alert on this traffic, and that scripts/render_dashboard.py draws every panel from it.

A second Prometheus watches real outages: an upstream nobody can reach, Redis stopped under a
busy and an idle replica, a writer past its configured bound, every sidecar gone; each pages.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.keys import Keys, RunId
from tests.conftest import (
    RESET,
    Gate,
    RedisServer,
    Sidecar,
    SidecarFactory,
    Step,
    Upstream,
    free_port,
)
from tests.functional.helpers import (
    DONE,
    LiveReader,
    error,
    eventually,
    import_file,
    stop,
    stream,
    token,
    write_run,
)
from tests.functional.test_prometheus_rules import RULE_FILES, binary, load_rules
from tests.unit.test_dashboard import FILTER_VARIABLES, load_dashboard, panels, substitute, targets

JOB = "sse-sidecar"
# What Kubernetes service discovery (and an external label) would put on the targets.
TARGET_LABELS = {"cluster": "test", "namespace": "llm"}
# Grafana's $__rate_interval is at least 4 scrape intervals (4 s here); one minute covers every
# wave of traffic below with plenty of samples. $__range: the whole test, with room to spare.
RATE_INTERVAL = "1m"
RANGE = "5m"
RENDER_SCRIPT = Path(__file__).parents[2] / "scripts" / "render_dashboard.py"


@dataclass
class Prometheus:
    url: str
    http: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(self.url + "/api/v1/" + path, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def until(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        await eventually(check, timeout=20.0, interval=0.2, what=f"Prometheus: {what}")

    async def active_alerts(self) -> dict[tuple[str, str], str]:
        """(alertname, severity) -> state (pending or firing) of every active alert."""
        alerts = (await self.api("alerts"))["alerts"]
        out: dict[tuple[str, str], str] = {}
        for a in alerts:
            key = (a["labels"]["alertname"], a["labels"]["severity"])
            # Several alerts under one key (per pod, per pair): firing wins.
            if out.get(key) != "firing":
                out[key] = a["state"]
        return out

    async def alerting(
        self, *expected: tuple[str, str], meanwhile: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        """Wait until every (alertname, severity) is pending or firing (doing ``meanwhile``
        before each look: traffic that goes on during an outage)."""

        async def active() -> bool:
            if meanwhile is not None:
                await meanwhile()
            return set(expected) <= set(await self.active_alerts())

        await self.until(active, f"alerts {expected} pending or firing")


def pod_name(sc: Sidecar) -> str:
    return f"llm-service-{sc.settings.admin_port}"


@pytest.fixture
async def prometheus_for(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Prometheus]]]:
    """Starts a Prometheus that scrapes sidecars' admin ports; stops it at the end."""
    procs: list[asyncio.subprocess.Process] = []
    http = aiohttp.ClientSession()  # its own: the `http` fixture does not decompress

    async def start(*sidecars: Sidecar) -> Prometheus:
        path = binary("prometheus")
        static = [
            {
                "targets": [sc.admin_url.removeprefix("http://")],
                "labels": {**TARGET_LABELS, "pod": pod_name(sc)},
            }
            for sc in sidecars
        ]
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [{"job_name": JOB, "static_configs": static}],
        }
        (tmp_path / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            path,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=log,
            stderr=log,
        )
        log.close()
        procs.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", http)

        async def ready() -> bool:
            if proc.returncode is not None:
                text = (tmp_path / "prometheus.log").read_text(errors="replace")
                raise AssertionError(f"prometheus exited {proc.returncode}:\n{text[-3000:]}")
            try:
                async with http.get(prom.url + "/-/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await prom.until(ready, "ready")

        async def scraped() -> bool:
            return await prom.value(f'sum(up{{job="{JOB}"}})') == len(sidecars)

        await prom.until(scraped, "every sidecar scraped")
        return prom

    try:
        yield start
    finally:
        await http.close()
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 10)


# -- traffic ---------------------------------------------------------------------------------

RUNS: dict[str, list[Step]] = {
    "normal": [token("Hel"), token("lo"), stop("end_turn"), DONE],
    # A natural end: the error event, then the upstream's own [DONE] (saw_done_after_error).
    "error_then_done": [token("a"), stop("llm_api_error"), error(), DONE],
    # Forced terminals: a clean EOF with nothing terminal, a reset, a stop reason without [DONE].
    "dies": [token("a")],
    "reset": [token("a"), RESET],
    "missing_done": [token("a"), stop("end_turn")],
    # Longer than max_stream_events (5): trimmed, and a replay from 0 gets 410.
    "long": [*(token(c) for c in "abcdefgh"), stop("end_turn"), DONE],
}


async def run(http: aiohttp.ClientSession, sc: Sidecar, kind: str) -> RunId:
    view = await stream(http, f"{sc.url}/v1/{kind}/stream", json={"messages": []})
    assert view.status == 200, (kind, view.status, view.body)
    return view.run_id


async def live_replay(
    http: aiohttp.ClientSession,
    sc: Sidecar,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    path: str,
) -> None:
    """A replay reader that follows a run live (replay_active, delivery lag)."""
    gate = Gate()
    upstream.sse(path, [token("first"), gate, token("second"), stop("end_turn"), DONE])
    async with http.post(sc.url + path, json={"messages": []}) as resp:
        run_id = resp.headers["X-Sidecar-Run-Id"]
        await asyncio.wait_for(gate.reached.wait(), 5)

        async def stored() -> bool:
            return int(await redis_client.xlen(Keys("sse:run:").stream(RunId(run_id)))) >= 1

        await eventually(stored, what="the first event stored")
        async with http.get(f"{sc.url}/sidecar/v1/runs/{run_id}/stream") as replay:
            assert replay.status == 200
            reader = LiveReader(replay)
            await reader.until(1)
            gate.open()
            await reader.rest()
        assert reader.events[-1].data == "[DONE]"
        await resp.read()


async def orphan(
    redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession, sc: Sidecar
) -> None:
    """A run whose producer died (its lease expired): the orphan sweep ends it with
    producer_lost."""
    run_id = RunId(f"orphan-{time.monotonic_ns()}")
    now_ms = int(time.time() * 1000)
    await write_run(
        redis_client,
        run_id,
        [f"id: 1\ndata: {json.dumps({'message_type': 'assistant_message'})}\n\n".encode()],
        {
            "status": "running",
            "producer": "gone-host:1:0123456789ab",
            "lease_until_ms": str(now_ms - 1000),
            "created_ms": str(now_ms - 5000),
            "updated_ms": str(now_ms - 5000),
            "route": "proxy",
        },
    )
    await redis_client.zadd("sse:run:leases", {run_id: now_ms - 1000})

    async def swept() -> bool:
        async with http.get(f"{sc.url}/sidecar/v1/runs/{run_id}") as resp:
            assert resp.status == 200
            return bool((await resp.json())["forced_done"] == "producer_lost")

    await eventually(swept, what="the orphan sweep")


async def wave(
    n: int,
    http: aiohttp.ClientSession,
    sc: Sidecar,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
) -> int:
    """One round of every kind of traffic; returns the number of runs it finished."""
    for kind, steps in RUNS.items():
        upstream.sse(f"/v1/{kind}/stream", steps)
    ids = {kind: await run(http, sc, kind) for kind in RUNS}
    await live_replay(http, sc, upstream, redis_client, f"/v1/live-{n}/stream")
    await sc.flushed()
    replays = {
        f"/sidecar/v1/runs/{ids['normal']}/stream": 200,
        f"/sidecar/v1/runs/{ids['error_then_done']}/stream?starting_after=1": 200,
        f"/sidecar/v1/runs/{ids['long']}/stream": 410,
        "/sidecar/v1/runs/no-such-run/stream": 404,
    }
    for path, status in replays.items():
        async with http.get(sc.url + path) as resp:
            await resp.read()
            assert resp.status == status, path
    await orphan(redis_client, http, sc)
    upstream.json("/v1/broken", {"error": "boom"}, status=500)
    async with http.get(sc.url + "/v1/broken") as resp:
        assert resp.status == 500
    return len(RUNS) + 2  # the live run and the orphan


async def test_the_dashboard_and_rules_on_a_real_prometheus(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    prometheus_for: Callable[..., Awaitable[Prometheus]],
    tmp_path: Path,
) -> None:
    # One Prometheus for every check: it takes 5 s to start scraping (its discovery manager
    # sends the first targets after 5 s), the rest takes a few seconds.
    sc = await make_sidecar(max_stream_events=5, lease_seconds=0.6)
    prom = await prometheus_for(sc)
    await nobody_replays_yet(prom)

    # Two waves, each scraped before the next: a labelled series first created by wave 1 (a new
    # status or stop reason) has samples before and after wave 2, so rate() sees it move.
    finished = 0
    for n in (1, 2):
        finished += await wave(n, http, sc, upstream, redis_client)

        async def scraped(expected: float = finished) -> bool:
            return await prom.value("sum(sse_sidecar_runs_finished_total)") == expected

        await prom.until(scraped, f"wave {n} scraped ({finished} finished runs)")

    await rules_loaded_as_written(prom)
    await every_query_returns_data(prom, sc)
    await alerts_on_this_traffic(prom)
    await the_picture_renders(prom, tmp_path)


async def nobody_replays_yet(prom: Prometheus) -> None:
    """Before any replay (before any traffic), the replay panels read 0, not "No data"."""

    async def two_scrapes() -> bool:  # a rate needs two samples
        return await prom.value(f'count_over_time(up{{job="{JOB}"}}[1m])') == 2

    await prom.until(two_scrapes, "two scrapes")
    row = [p for p in panels() if p["type"] != "row" and 40 <= p["id"] < 50]
    assert len(row) == 6
    for panel in row:
        for target in panel["targets"]:
            query = substitute(target["expr"], rate_interval=RATE_INTERVAL, range_=RANGE)
            values = [float(s["value"][1]) for s in await prom.query(query)]
            assert values, f"{panel['title']}: no data ({query})"
            assert set(values) == {0.0}, f"{panel['title']}: {values}"


async def rules_loaded_as_written(prom: Prometheus) -> None:
    """What Prometheus loaded is what test_prometheus_rules.py reads from the files, and every
    rule evaluates without error."""

    def key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted(labels.items()))

    groups = (await prom.api("rules"))["groups"]
    loaded = {key(r["name"], r.get("labels", {})): r for g in groups for r in g["rules"]}
    mine = {key(r.name, dict(r.labels)): r for r in load_rules()}
    assert set(loaded) == set(mine)
    for name, rule in mine.items():
        got = loaded[name]
        assert got["type"] == ("alerting" if rule.alert else "recording"), name
        assert got["health"] == "ok", (name, got.get("lastError"))
        if rule.alert:
            assert got["annotations"] == dict(rule.annotations), name
            assert rule.for_ is not None
            assert got["duration"] == _seconds(rule.for_), name


async def every_query_returns_data(prom: Prometheus, sc: Sidecar) -> None:
    """Every recording rule and every panel query (variables set to All) has a finite value."""
    records = [r.name for r in load_rules() if not r.alert]
    for name in records:

        async def recorded(name: str = name) -> bool:
            return bool(await prom.query(name))

        await prom.until(recorded, f"{name} recorded")

    empty: list[str] = []
    for name in records:
        values = [float(s["value"][1]) for s in await prom.query(name)]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"recording rule {name}: {values}")
    for panel, expr in targets():
        query = substitute(expr, rate_interval=RATE_INTERVAL, range_=RANGE)
        result = await prom.query(query)
        if not any(math.isfinite(float(sample["value"][1])) for sample in result):
            empty.append(f"panel {panel['id']} {panel['title']!r}: {query} -> {result}")
    assert empty == [], "\n".join(empty)

    # The dashboard's variables find this sidecar.
    wanted = {**TARGET_LABELS, "job": JOB, "pod": pod_name(sc)}
    assert set(wanted) == set(FILTER_VARIABLES)
    for name, value in wanted.items():
        values = await prom.api(f"label/{name}/values", **{"match[]": "sse_sidecar_build_info"})
        assert values == [value], (name, values)


async def alerts_on_this_traffic(prom: Prometheus) -> None:
    """Half of the runs end with a forced terminal: the page-level burn-rate rule (14.4x over 1h
    and 5m) is pending (its `for` is 2m), and the run whose producer died fires
    SSESidecarProducerLost at once."""

    async def alerting() -> bool:
        now = await prom.active_alerts()
        return (
            now.get(("SSESidecarForcedTerminalBurnRate", "critical")) in ("pending", "firing")
            and now.get(("SSESidecarProducerLost", "warning")) == "firing"
        )

    await prom.until(alerting, "the burn-rate alert pending and SSESidecarProducerLost firing")
    alerts = (await prom.api("alerts"))["alerts"]
    pages = [
        a
        for a in alerts
        if a["labels"]["alertname"] == "SSESidecarForcedTerminalBurnRate"
        and a["labels"]["severity"] == "critical"
    ]
    assert {(p["labels"]["long"], p["labels"]["short"]) for p in pages} >= {("1h", "5m")}
    for page in pages:
        assert (page["labels"]["namespace"], page["labels"]["job"]) == ("llm", JOB)
        assert page["annotations"]["runbook_url"].endswith("#ssesidecarforcedterminalburnrate")
    # Nothing this traffic must trigger.
    names = {a["labels"]["alertname"] for a in alerts}
    quiet = {
        "SSESidecarTargetDown",
        "SSESidecarTargetAbsent",
        "SSESidecarJobDown",
        "SSESidecarEventsDropped",
        "SSESidecarRedisUnreachable",
        "SSESidecarUpstreamUnreachable",
        "SSESidecarProxyServerErrors",
        "SSESidecarWriterBacklogHigh",
    }
    assert not names & quiet, names & quiet


async def the_picture_renders(prom: Prometheus, tmp_path: Path) -> None:
    """scripts/render_dashboard.py (the README's picture) draws every panel from this data."""
    # Imported in a thread: matplotlib's import holds the thread that runs it for more than a
    # second, and this loop also serves the sidecar's /metrics (a 1 s scrape timeout).
    render = await asyncio.to_thread(import_file, RENDER_SCRIPT)
    # Drawn as of the newest scrape that succeeded: after one that timed out on a busy machine
    # the gauges are stale "now", and their stat panels would show No data.
    last_good: list[float] = []

    async def scraped() -> bool:
        at = await prom.value(f'max(timestamp(up{{job="{JOB}"}} == 1))')
        if at is not None:
            last_good.append(at)
        return at is not None

    await prom.until(scraped, "a scrape that succeeded")
    end = last_good[-1]
    # The script is synchronous (urllib): in a thread, so that this loop keeps serving scrapes.
    figure, drawn = await asyncio.to_thread(
        render.render, render.Prometheus(prom.url), "2m", {}, end
    )
    titles = [p["title"] for p in load_dashboard()["panels"] if p["type"] != "row"]
    assert [d.title for d in drawn] == titles
    assert [d.title for d in drawn if not d.series] == [], "panels drawn with no data"
    figure.savefig(tmp_path / "dashboard.png", dpi=40)
    assert (tmp_path / "dashboard.png").read_bytes().startswith(b"\x89PNG")


def _seconds(duration: str) -> float:
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


async def test_outages_page_on_a_real_prometheus(
    make_sidecar: SidecarFactory,
    restartable_redis: RedisServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    prometheus_for: Callable[..., Awaitable[Prometheus]],
) -> None:
    """Two replicas of one deployment: `busy` tees streams under a 4 KiB writer bound, `idle`
    has lost its upstream. Each outage makes its alert pending (their `for` is minutes: pending
    is the rule's condition met, evaluated by Prometheus on the real series)."""
    probe = {"redis_probe_seconds": 0.2, "redis_timeout_seconds": 0.5}
    busy = await make_sidecar(redis_url=restartable_redis.url, writer_max_bytes=4096, **probe)
    idle = await make_sidecar(
        redis_url=restartable_redis.url, upstream_url=f"http://127.0.0.1:{free_port()}", **probe
    )
    prom = await prometheus_for(busy, idle)

    # The LLM service is gone: every request through `idle` gets 502, as long as clients try.
    async def request() -> None:
        assert (await stream(http, idle.url + "/v1/agents/a/messages", json={})).status == 502

    await prom.alerting(
        ("SSESidecarUpstreamUnreachable", "critical"),
        ("SSESidecarProxyServerErrors", "critical"),
        meanwhile=request,
    )

    # Redis stops. Both probes say so, the idle replica's too: it never wrote anything.
    restartable_redis.stop()

    async def redis_down() -> bool:
        return await prom.value(f'sum(sse_sidecar_redis_up{{job="{JOB}"}})') == 0

    await prom.until(redis_down, "every replica's probe failing")
    assert idle.metric("sse_sidecar_flushes_total", outcome="error") == 0
    # `busy` streams on: its writer fills its configured bound, then drops.
    upstream.sse(
        "/v1/long/stream", [*(token("x" * 200) for _ in range(60)), stop("end_turn"), DONE]
    )
    view = await stream(http, busy.url + "/v1/long/stream", json={})
    assert view.status == 200
    assert len(view.events) == 62
    assert busy.metric("sse_sidecar_writer_pending_bytes") > 0.8 * 4096
    assert busy.metric("sse_sidecar_writer_dropped_events_total", reason="overflow") >= 10
    await prom.alerting(
        ("SSESidecarRedisUnreachable", "critical"),
        ("SSESidecarWriterBacklogHigh", "warning"),
        ("SSESidecarEventsDropped", "warning"),
    )

    # Redis is back: the probes say so, the backlog drains.
    restartable_redis.start()

    async def redis_back() -> bool:
        return await prom.value(f'sum(sse_sidecar_redis_up{{job="{JOB}"}})') == 2

    await prom.until(redis_back, "every replica's probe passing again")

    # Every sidecar of the deployment stops: their targets are down, not gone, and that pages.
    await busy.stop()
    await idle.stop()
    await prom.alerting(("SSESidecarTargetAbsent", "critical"), ("SSESidecarJobDown", "critical"))
