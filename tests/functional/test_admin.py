"""The admin port: /healthz, /readyz, /metrics (DESIGN.md "Telemetry", issue 4).

/healthz is liveness (no dependency checks); /readyz fails on an unreachable Redis, a writer
backlog above 80% of its bound, and a drain (first thing on shutdown); /metrics speaks the
Prometheus text format and OpenMetrics. Labels are bounded: ``route`` is a route name.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import redis.asyncio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)

from sidecar import __version__
from sidecar.app import STATE
from sidecar.terminal import Dialect, ForcedDone, Transition
from tests.conftest import RESET, Gate, RedisServer, Sidecar, SidecarFactory, Upstream, free_port
from tests.functional.helpers import (
    DONE,
    LiveReader,
    data,
    error,
    eventually,
    nonzero,
    samples,
    stop,
    stream,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"
BACKLOG = "writer backlog above 80% of writer_max_bytes"


async def probe(http: aiohttp.ClientSession, sc: Sidecar, path: str) -> tuple[int, Any]:
    async with http.get(sc.admin_url + path) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def metrics_text(
    http: aiohttp.ClientSession, sc: Sidecar, accept: str | None = None
) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with http.get(sc.admin_url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


# -- probes ---------------------------------------------------------------------------------


async def test_healthz_and_readyz_when_all_is_well(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    assert await probe(http, sidecar, "/healthz") == (200, {"status": "ok"})
    assert await probe(http, sidecar, "/readyz") == (200, {"status": "ready"})


async def test_readyz_fails_when_redis_is_unreachable_but_healthz_does_not(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    status, body = await probe(http, sc, "/readyz")
    assert status == 503
    assert body["status"] == "unready"
    assert len(body["problems"]) == 1
    assert body["problems"][0].startswith("redis unreachable: ")
    assert await probe(http, sc, "/healthz") == (200, {"status": "ok"})


async def test_readyz_fails_while_draining(sidecar: Sidecar, http: aiohttp.ClientSession) -> None:
    sidecar.app[STATE].draining = True
    assert await probe(http, sidecar, "/readyz") == (
        503,
        {"status": "unready", "problems": ["draining"]},
    )
    assert await probe(http, sidecar, "/healthz") == (200, {"status": "ok"})


async def test_shutdown_turns_readyz_unready_before_the_running_stream_ends(
    sidecar: Sidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    async with http.post(sidecar.url + PATH, json={}) as resp:
        reader = LiveReader(resp)
        await reader.until(1)
        await gate.reached.wait()
        stopping = asyncio.create_task(sidecar.stop())  # on_shutdown: the drain begins

        async def unready() -> bool:
            return (await probe(http, sidecar, "/readyz"))[0] == 503

        await eventually(unready, what="/readyz to report the drain")
        assert await probe(http, sidecar, "/readyz") == (
            503,
            {"status": "unready", "problems": ["draining"]},
        )
        assert await probe(http, sidecar, "/healthz") == (200, {"status": "ok"})
        assert not stopping.done()
        gate.open()  # the run finishes within the drain
        await reader.rest()
    assert reader.events[-1].data == "[DONE]"
    assert len(reader.events) == 4
    await asyncio.wait_for(stopping, 10)
    assert sidecar.metric("sse_sidecar_forced_done_total", reason="sidecar_shutdown") == 0


async def test_readyz_fails_while_the_writer_backlog_is_above_80_percent(
    make_sidecar: SidecarFactory,
    restartable_redis: RedisServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    max_bytes = 20_000
    sc = await make_sidecar(
        redis_url=restartable_redis.url, writer_max_bytes=max_bytes, redis_timeout_seconds=0.5
    )
    assert (await probe(http, sc, "/readyz"))[0] == 200
    restartable_redis.stop()
    # ~1 KB events; the writer holds what it can (up to its bound) while Redis is away.
    upstream.sse(PATH, [token(f"{i:03d}" + "x" * 1000) for i in range(30)] + [stop("end_turn")])
    view = await stream(http, sc.url + PATH, json={})
    assert view.status == 200
    # The client's last byte comes after the run's end was counted.
    assert sc.metric("sse_sidecar_runs_active") == 0
    assert view.events[-1].data == "[DONE]"
    pending = sc.metric("sse_sidecar_writer_pending_bytes")
    assert 0.8 * max_bytes < pending <= max_bytes
    status, body = await probe(http, sc, "/readyz")
    assert status == 503
    assert body["problems"][0] == BACKLOG
    assert body["problems"][1].startswith("redis unreachable: ")
    assert len(body["problems"]) == 2

    restartable_redis.start()

    async def ready_again() -> bool:
        return (await probe(http, sc, "/readyz"))[0] == 200

    # The writer retries with a capped backoff; once its backlog is written, ready again.
    await eventually(ready_again, timeout=15, interval=0.05, what="/readyz to recover")
    assert sc.metric("sse_sidecar_writer_pending_bytes") == 0


# -- /metrics -------------------------------------------------------------------------------


async def test_metrics_content_types_and_build_info(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    ctype, text = await metrics_text(http, sidecar)
    assert ctype == CONTENT_TYPE_LATEST
    assert ctype.startswith("text/plain")
    assert f'sse_sidecar_build_info{{version="{__version__}"}} 1.0\n' in text
    assert "# HELP sse_sidecar_build_info Version of the running sidecar.\n" in text
    assert "# EOF" not in text

    ctype, om = await metrics_text(http, sidecar, "application/openmetrics-text")
    assert ctype == OPENMETRICS_CONTENT_TYPE
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert om.endswith("# EOF\n")
    assert f'sse_sidecar_build_info{{version="{__version__}"}} 1.0\n' in om
    assert "# TYPE sse_sidecar_build info\n" in om

    # Browsers and curl's default Accept get the text format.
    ctype, _ = await metrics_text(http, sidecar, "text/html,*/*;q=0.8")
    assert ctype == CONTENT_TYPE_LATEST


async def test_every_family_has_help_text_in_both_formats(
    sidecar: Sidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    await stream(http, sidecar.url + PATH, json={})
    await sidecar.flushed()
    for accept in (None, "application/openmetrics-text"):
        _, text = await metrics_text(http, sidecar, accept)
        typed = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
        helped = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.MULTILINE))
        assert len(typed) >= 25
        assert set(typed) == set(helped), accept
        assert all(name.startswith("sse_sidecar_") for name in typed)


async def test_route_labels_are_route_names_never_raw_paths(
    sidecar: Sidecar,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    upstream.json("/v1/models", {"data": []})
    view = await stream(http, sidecar.url + PATH, json={})
    run = view.run_id
    await sidecar.flushed()
    calls = [
        ("GET", "/v1/models", 200),  # proxied, not teed
        ("GET", "/v1/agents/agent-42/nothing-here", 404),  # the upstream's 404, proxied
        ("GET", f"/sidecar/v1/runs/{run}/stream", 200),
        ("GET", "/sidecar/v1/runs/run_unknown/stream", 404),
        ("POST", f"/sidecar/v1/runs/{run}/stream", 200),
        ("POST", f"/v1/runs/{run}/stream", 200),
        ("GET", f"/sidecar/v1/runs/{run}", 200),
        ("POST", f"/sidecar/v1/runs/{run}/cancel", 409),  # already finished
        ("GET", "/sidecar/v1/no/such/route", 404),
    ]
    for method, path, code in calls:
        async with http.request(method, sidecar.url + path, json=None) as resp:
            await resp.read()
            assert resp.status == code, (method, path)
    assert samples(sidecar.metrics.registry, "sse_sidecar_http_requests_total") == {
        (("code", "200"), ("method", "POST"), ("route", "proxy")): 1.0,
        (("code", "200"), ("method", "GET"), ("route", "proxy")): 1.0,
        (("code", "404"), ("method", "GET"), ("route", "proxy")): 1.0,
        (("code", "200"), ("method", "GET"), ("route", "replay")): 1.0,
        (("code", "404"), ("method", "GET"), ("route", "replay")): 1.0,
        (("code", "200"), ("method", "POST"), ("route", "replay_post")): 1.0,
        (("code", "200"), ("method", "POST"), ("route", "letta_replay")): 1.0,
        (("code", "200"), ("method", "GET"), ("route", "status")): 1.0,
        (("code", "409"), ("method", "POST"), ("route", "cancel")): 1.0,
        (("code", "404"), ("method", "GET"), ("route", "sidecar_other")): 1.0,
    }
    counts = samples(sidecar.metrics.registry, "sse_sidecar_http_request_duration_seconds_count")
    assert counts == {
        (("route", "proxy"),): 3.0,
        (("route", "replay"),): 2.0,
        (("route", "replay_post"),): 1.0,
        (("route", "letta_replay"),): 1.0,
        (("route", "status"),): 1.0,
        (("route", "cancel"),): 1.0,
        (("route", "sidecar_other"),): 1.0,
    }
    _, text = await metrics_text(http, sidecar)
    assert run not in text
    assert "agent-42" not in text
    assert "/v1/" not in text


# -- every terminal row through one sidecar: the exact counters ------------------------------


async def test_one_stream_per_terminal_row_gives_exact_counters(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    rows: dict[str, list[Any]] = {
        "normal": [token("a"), stop("end_turn"), DONE],
        "missing_done": [token("a"), stop("end_turn")],
        "missing_done_after_error": [token("a"), error()],
        "stream_incomplete": [token("a"), data({"message_type": "reasoning_message"})],
        "upstream_error": [token("a"), RESET],
    }
    for name, steps in rows.items():
        upstream.sse(PATH, steps)
        view = await stream(http, sc.url + PATH, json={})
        assert view.status == 200, name
        assert view.events[-1].data == "[DONE]", name
    await sc.flushed()
    registry = sc.metrics.registry
    # Every known label value exists from the start (at 0); these five runs moved exactly these.
    L = ("dialect", "letta")
    dialects = [d.value for d in Dialect]
    assert samples(registry, "sse_sidecar_forced_done_total") == {
        (("dialect", d), ("reason", reason.value)): 0.0 for d in dialects for reason in ForcedDone
    } | {
        (L, ("reason", "missing_done")): 1.0,
        (L, ("reason", "missing_done_after_error")): 1.0,
        (L, ("reason", "stream_incomplete")): 1.0,
        (L, ("reason", "upstream_error")): 1.0,
    }
    assert nonzero(samples(registry, "sse_sidecar_runs_finished_total")) == {
        (L, ("status", "completed"), ("stop_reason", "end_turn")): 2.0,
        (L, ("status", "failed"), ("stop_reason", "none")): 1.0,
        (L, ("status", "failed"), ("stop_reason", "error")): 2.0,
    }
    assert samples(registry, "sse_sidecar_stream_transitions_total") == {
        (("transition", "saw_stop_reason"),): 2.0,
        (("transition", "saw_error"),): 1.0,
        (("transition", "saw_done"),): 1.0,
        (("transition", "saw_done_after_error"),): 0.0,
    }
    # Started and finished pair per dialect: the forced ratio of each dialect is right.
    assert samples(registry, "sse_sidecar_runs_started_total") == {
        (("dialect", d), ("route", "proxy")): 5.0 if d == "letta" else 0.0 for d in dialects
    }
    assert sc.metric("sse_sidecar_runs_active") == 0
    assert sc.metric("sse_sidecar_run_duration_seconds_count", status="completed") == 2
    assert sc.metric("sse_sidecar_run_duration_seconds_count", status="failed") == 3
    assert sc.metric("sse_sidecar_run_duration_seconds_count", status="cancelled") == 0
    assert {t.value for t in Transition} == {
        label for ((_, label),) in samples(registry, "sse_sidecar_stream_transitions_total")
    }
    assert sc.metric("sse_sidecar_upstream_first_event_seconds_count") == 5


async def test_ready_without_redis_reports_degraded_instead_of_unready(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    strict = await make_sidecar(redis_url=dead, redis_timeout_seconds=0.3)
    lenient = await make_sidecar(
        redis_url=dead, redis_timeout_seconds=0.3, ready_without_redis=True
    )
    async with http.get(strict.admin_url + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "unready"
    async with http.get(lenient.admin_url + "/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "degraded"
    assert any(p.startswith("redis unreachable") for p in body["problems"])
    lenient.app[STATE].draining = True
    async with http.get(lenient.admin_url + "/readyz") as resp:
        assert resp.status == 503
