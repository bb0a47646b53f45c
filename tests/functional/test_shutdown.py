"""SIGTERM with the real CLI (``python -m sidecar serve``) in a subprocess: DESIGN.md "The writer"
(flush within a deadline on shutdown), the terminal table's ``sidecar_shutdown`` row, and
``sidecar.app.serve``'s order: unready, stop accepting, drain, force the rest, flush, exit.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.keys import RunId
from tests.conftest import HANG, Gate, RedisServer, Upstream, free_port
from tests.functional.helpers import (
    DONE,
    LiveReader,
    eventually,
    meta,
    payloads,
    scraped_value,
    stop,
    stored,
    token,
)


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    admin_url: str
    log: Path

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


ServeFactory = Callable[..., Awaitable[Served]]


async def readyz(http: aiohttp.ClientSession, served: Served) -> tuple[int, Any]:
    async with http.get(served.admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def serve(
    upstream: Upstream,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    async def start(drain_seconds: float, *flags: str) -> Served:
        port, admin = free_port(), free_port()
        log = tmp_path / f"sidecar-{port}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--upstream-url",
                upstream.url,
                "--redis-url",
                redis_server.url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--admin-port",
                str(admin),
                "--drain-seconds",
                str(drain_seconds),
                "--log-format",
                "text",
                *flags,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        served = Served(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)
        started.append(served)

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"sidecar exited early:\n{served.output()}")
            try:
                return (await readyz(http, served))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, timeout=20, interval=0.05, what="the sidecar's /readyz")
        return served

    yield start
    for served in started:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


async def test_a_stream_that_finishes_within_the_drain_ends_naturally(
    serve: ServeFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse("/v1/chat", [token("a"), gate, token("b"), stop("end_turn"), DONE])
    served = await serve(drain_seconds=10)
    async with http.post(served.url + "/v1/chat") as resp:
        assert resp.status == 200
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        reader = LiveReader(resp)
        await reader.until(1)
        await gate.reached.wait()
        served.sigterm()

        async def draining() -> bool:
            return (await readyz(http, served))[0] == 503

        await eventually(draining, what="/readyz to report the drain")
        gate.open()  # the upstream finishes while the sidecar drains
        body = await reader.rest()
    assert await served.exit_code(10) == 0, served.output()
    assert [p.get("content", p.get("stop_reason")) for p in payloads(reader.events[:3])] == [
        "a",
        "b",
        "end_turn",
    ]
    assert reader.events[-1].data == "[DONE]"
    assert len(reader.events) == 4
    rows = await stored(redis_client, run_id)
    assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4]
    assert "".join(r["data"] for r in rows).encode() == body
    h = await meta(redis_client, run_id)
    assert h["status"] == "completed"
    assert h["stop_reason"] == "end_turn"
    assert h["forced_done"] == ""
    assert "sidecar_shutdown" not in served.output()


async def test_a_stream_that_never_finishes_is_ended_with_sidecar_shutdown(
    serve: ServeFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse("/v1/chat", [token("a"), token("b"), HANG])
    drain = 0.5
    served = await serve(drain_seconds=drain)
    async with http.post(served.url + "/v1/chat") as resp:
        assert resp.status == 200
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        reader = LiveReader(resp)
        await reader.until(2)
        sent = time.monotonic()
        served.sigterm()
        body = await reader.rest(timeout=drain + 8)
    assert await served.exit_code(drain + 8) == 0, served.output()
    assert time.monotonic() - sent < drain + 4
    events = reader.events
    assert len(events) == 5
    data = payloads(events)
    assert [d["content"] for d in data[:2]] == ["a", "b"]
    assert data[2] == {"message_type": "stop_reason", "stop_reason": "error", "seq_id": 3,
                       "run_id": run_id}  # fmt: skip
    assert events[3].event == "error"
    assert data[3]["error_type"] == "sidecar_shutdown"
    assert events[4].data == "[DONE]"
    assert [e.id for e in events] == ["1", "2", "3", "4", "5"]
    rows = await stored(redis_client, run_id)
    assert [int(r["seq_id"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["complete"] for r in rows] == ["false"] * 4 + ["true"]
    assert "".join(r["data"] for r in rows).encode() == body
    h = await meta(redis_client, run_id)
    assert h["forced_done"] == "sidecar_shutdown"
    assert h["status"] == "failed"
    assert h["stop_reason"] == "error"
    assert h["last_seq"] == "5"


async def test_during_the_drain_new_connections_are_refused_and_readyz_is_503(
    serve: ServeFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse("/v1/chat", [token("a"), gate, stop("end_turn"), DONE])
    served = await serve(drain_seconds=10)
    async with http.post(served.url + "/v1/chat") as resp:
        reader = LiveReader(resp)
        await reader.until(1)
        await gate.reached.wait()
        served.sigterm()

        async def draining() -> bool:
            status, body = await readyz(http, served)
            return status == 503 and body == {"status": "unready", "problems": ["draining"]}

        # serve() sets the draining flag and closes the listener with no await in between, so
        # once /readyz says "draining" the traffic port no longer accepts connections.
        await eventually(draining, what="/readyz to report the drain")
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                async with fresh.get(served.url + "/v1/other"):
                    pass
        assert served.proc.returncode is None  # still draining: the stream is held open
        assert len(upstream.requests) == 1
        gate.open()
        await reader.rest()
    assert await served.exit_code(10) == 0, served.output()
    assert reader.events[-1].data == "[DONE]"
    assert (await meta(redis_client, RunId(resp.headers["X-Sidecar-Run-Id"])))[
        "status"
    ] == "completed"


async def test_the_final_counts_are_scraped_after_the_last_run_ended(
    serve: ServeFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """The admin port outlives the drain and the flush (metrics_grace_seconds), so the scrape
    after the run ended still reads its sidecar_shutdown and every other final count; that
    scrape ends the grace."""
    upstream.sse("/v1/chat", [token("a"), token("b"), HANG])
    served = await serve(0.5, "--metrics-grace-seconds", "30")
    async with http.post(served.url + "/v1/chat") as resp:
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        reader = LiveReader(resp)
        await reader.until(2)
        served.sigterm()
        await reader.rest(timeout=10)
    assert reader.events[-1].data == "[DONE]"

    async def final() -> bool:
        return "serving the final counts on /metrics for up to 30.0s" in served.output()

    # The drain is over and the writer has flushed: every count is final now.
    await eventually(final, timeout=10, what="the sidecar to serve its final counts")
    assert (await meta(redis_client, run_id))["forced_done"] == "sidecar_shutdown"
    async with http.get(served.admin_url + "/metrics") as scrape:
        assert scrape.status == 200
        text = await scrape.text()
    scrape_ended = time.monotonic()

    def value(name: str, **labels: str) -> float:
        return scraped_value(text, name, **labels)

    assert value("sse_sidecar_forced_done_total", reason="sidecar_shutdown") == 1
    assert value("sse_sidecar_forced_done_total") == 1
    assert value("sse_sidecar_runs_started_total") == 1
    assert value("sse_sidecar_runs_finished_total", status="failed", stop_reason="error") == 1
    assert value("sse_sidecar_runs_finished_total") == 1
    assert value("sse_sidecar_runs_active") == 0
    assert value("sse_sidecar_stream_events_total") == 5  # a, b and the three synthesized
    assert value("sse_sidecar_run_duration_seconds_count", status="failed") == 1
    assert value("sse_sidecar_http_requests_total", route="proxy", code="200") == 1
    assert value("sse_sidecar_writer_pending_events") == 0
    assert value("sse_sidecar_writer_dropped_events_total") == 0
    assert value("sse_sidecar_flushes_total", outcome="ok") >= 1
    assert value("sse_sidecar_flushes_total", outcome="error") == 0
    # That scrape read the final counts: the process exits without waiting out the 30 s.
    assert await served.exit_code(10) == 0, served.output()
    assert time.monotonic() - scrape_ended < 10


async def test_without_a_scrape_the_metrics_grace_ends_after_its_seconds(
    serve: ServeFactory, http: aiohttp.ClientSession
) -> None:
    served = await serve(0.5, "--metrics-grace-seconds", "1")
    sent = time.monotonic()
    served.sigterm()

    async def final() -> bool:
        return "serving the final counts" in served.output()

    await eventually(final, timeout=10, what="the sidecar to serve its final counts")
    async with http.get(served.admin_url + "/healthz") as resp:
        assert resp.status == 200  # still up: the liveness probe must not kill it meanwhile
    assert await served.exit_code(10) == 0, served.output()
    assert time.monotonic() - sent >= 1.0
    assert "no scrape read the final counts within 1.0s" in served.output()
