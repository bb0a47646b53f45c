"""The shipped dashboard and rules against a real Prometheus scraping a real sidecar.

A Prometheus (the Debian package's binary, scrape and evaluation every second, the shipped
recording and alert rules loaded) scrapes the admin port of a sidecar that tees a mix of streams
from a real upstream into a real Redis: normal runs, an error followed by the upstream's [DONE],
streams that die (clean EOF, connection reset), a stop reason without [DONE], a run longer than
the length cap, live and historical replays, a 410, a 404, a run whose producer died, and a 5xx.
Then every dashboard query and every recording rule is evaluated through Prometheus' HTTP API,
and each must return data: a panel that can never show anything is a bug. The same Prometheus
also shows that it loaded the rules as written, that they alert on this traffic, and that
scripts/render_dashboard.py draws every panel from it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
import redis.asyncio

from sidecar.keys import Keys, RunId
from tests.conftest import RESET, Gate, Sidecar, SidecarFactory, Step, Upstream, free_port
from tests.functional.helpers import (
    DONE,
    LiveReader,
    error,
    eventually,
    stop,
    stream,
    token,
    write_run,
)
from tests.functional.test_prometheus_rules import RULE_FILES, binary, load_rules
from tests.unit.test_dashboard import load_dashboard, substitute, targets

JOB = "sse-sidecar"
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


@pytest.fixture
async def prometheus_for(
    tmp_path: Path,
) -> AsyncIterator[Callable[[Sidecar], Awaitable[Prometheus]]]:
    """Starts a Prometheus that scrapes a sidecar's admin port; stops it at the end."""
    procs: list[asyncio.subprocess.Process] = []
    http = aiohttp.ClientSession()  # its own: the `http` fixture does not decompress

    async def start(sc: Sidecar) -> Prometheus:
        path = binary("prometheus")
        admin = sc.admin_url.removeprefix("http://")
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [admin]}]}],
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
            return await prom.value(f'up{{job="{JOB}"}}') == 1.0

        await prom.until(scraped, "the sidecar scraped")
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
    prometheus_for: Callable[[Sidecar], Awaitable[Prometheus]],
    tmp_path: Path,
) -> None:
    # One Prometheus for every check: it takes 5 s to start scraping (its discovery manager
    # sends the first targets after 5 s), the rest takes a few seconds.
    sc = await make_sidecar(max_stream_events=5, lease_seconds=0.6)
    prom = await prometheus_for(sc)

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


async def rules_loaded_as_written(prom: Prometheus) -> None:
    """What Prometheus loaded is what test_prometheus_rules.py reads from the files, and every
    rule evaluates without error."""
    loaded = {r["name"]: r for g in (await prom.api("rules"))["groups"] for r in g["rules"]}
    mine = {r.name: r for r in load_rules()}
    assert set(loaded) == set(mine)
    for name, rule in mine.items():
        got = loaded[name]
        assert got["type"] == ("alerting" if rule.alert else "recording"), name
        assert got.get("labels", {}) == dict(rule.labels), name
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

    # The dashboard's variables find this sidecar (there is no namespace label here).
    for name, wanted in (("job", JOB), ("instance", sc.admin_url.removeprefix("http://"))):
        values = await prom.api(f"label/{name}/values", **{"match[]": "sse_sidecar_build_info"})
        assert wanted in values, (name, values)


async def alerts_on_this_traffic(prom: Prometheus) -> None:
    """A third of the runs end with a forced terminal: the page-level burn-rate alert is pending
    (its `for` is 2m), and the run whose producer died fires SSESidecarProducerLost at once."""

    async def states() -> dict[str, str]:
        alerts = (await prom.api("alerts"))["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in alerts}

    async def alerting() -> bool:
        now = await states()
        return (
            now.get("SSESidecarForcedTerminalBurnRateCritical") in ("pending", "firing")
            and now.get("SSESidecarProducerLost") == "firing"
        )

    await prom.until(alerting, "the burn-rate alert pending and SSESidecarProducerLost firing")
    alerts = {a["labels"]["alertname"]: a for a in (await prom.api("alerts"))["alerts"]}
    page = alerts["SSESidecarForcedTerminalBurnRateCritical"]
    assert page["labels"]["job"] == JOB
    assert page["annotations"]["runbook_url"].endswith("#ssesidecarforcedterminalburnratecritical")
    # Nothing this traffic must not trigger.
    for quiet in ("SSESidecarTargetDown", "SSESidecarTargetAbsent", "SSESidecarEventsDropped"):
        assert quiet not in alerts, alerts[quiet]


async def the_picture_renders(prom: Prometheus, tmp_path: Path) -> None:
    """scripts/render_dashboard.py (the README's picture) draws every panel from this data."""
    spec = importlib.util.spec_from_file_location("render_dashboard", RENDER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    filters = {"namespace": ".*", "job": ".*", "instance": ".*"}
    # The script is synchronous (urllib): in a thread, so that this loop keeps serving scrapes.
    svg = await asyncio.to_thread(
        render.render, render.Prometheus(prom.url), "2m", filters, time.time()
    )
    root = ElementTree.fromstring(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    titles = {p["title"] for p in load_dashboard()["panels"]}
    assert titles <= set(texts)
    assert "No data" not in texts
    (tmp_path / "dashboard.svg").write_text(svg)


def _seconds(duration: str) -> float:
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]
