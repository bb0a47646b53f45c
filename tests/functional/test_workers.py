"""``sse-sidecar serve --workers 2`` with the real CLI: two processes on one traffic port
(SO_REUSEPORT), one admin port for both (every worker series labelled ``worker``), a crashed
worker leaves the other serving and is started again, SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream
from tests.functional.helpers import DONE, eventually, scraped_value, stop, token
from tests.functional.test_shutdown import Served, ServeFactory, readyz, serve  # noqa: F401

RUNS = 24


async def one_run(url: str, *, retries: int = 0) -> bytes:
    """One teed stream on a connection of its own (so the kernel picks a worker for each);
    ``retries``: connection resets before a response (what a client's SDK retries)."""
    for attempt in range(retries + 1):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            try:
                async with http.post(url + "/v1/chat") as resp:
                    assert resp.status == 200
                    return await resp.read()
            except (aiohttp.ClientConnectorError, aiohttp.ClientOSError):
                if attempt == retries:
                    raise
    raise AssertionError("unreachable")


async def scrape(http: aiohttp.ClientSession, served: Served) -> str:
    async with http.get(served.admin_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def workers_of(text: str, name: str) -> dict[str, float]:
    """The value of ``name`` per ``worker`` label."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                worker = sample.labels.get("worker", "")
                out[worker] = out.get(worker, 0.0) + sample.value
    return out


async def all_ready(http: aiohttp.ClientSession, served: Served) -> list[int]:
    """Until every worker is ready (the supervisor is ready with one); their pids."""
    pids: list[int] = []

    async def ready() -> bool:
        status, body = await readyz(http, served)
        pids[:] = [w["pid"] for w in body["workers"] if w["ready"]]
        return status == 200 and len(pids) == len(body["workers"])

    await eventually(ready, timeout=30, what="every worker ready")
    return pids


def script(upstream: Upstream) -> bytes:
    upstream.sse("/v1/chat", [token("a"), token("b"), stop("end_turn"), DONE])
    return b"".join((token("a"), token("b"), stop("end_turn"), DONE))


async def test_two_workers_share_the_traffic_port_and_one_admin_port(
    serve: ServeFactory,  # noqa: F811
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    script(upstream)
    served = await serve(5, "--workers", "2")
    await all_ready(http, served)
    bodies = await asyncio.gather(*(one_run(served.url) for _ in range(RUNS)))
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)

    async def counted() -> bool:
        text = await scrape(http, served)
        return scraped_value(text, "sse_sidecar_runs_finished_total") == RUNS

    await eventually(counted, timeout=10, what="every run counted across the workers")
    text = await scrape(http, served)
    started = workers_of(text, "sse_sidecar_runs_started_total")
    # Both workers took runs (all 24 connections on one worker: a 2^-23 chance).
    assert set(started) == {"0", "1"}
    assert all(n > 0 for n in started.values())
    assert sum(started.values()) == RUNS
    assert workers_of(text, "sse_sidecar_build_info") == {"0": 1.0, "1": 1.0}
    assert scraped_value(text, "sse_sidecar_workers") == 2
    assert scraped_value(text, "sse_sidecar_workers_up") == 2
    assert scraped_value(text, "sse_sidecar_worker_restarts_total") == 0
    status, body = await readyz(http, served)
    assert status == 200
    assert [w["ready"] for w in body["workers"]] == [True, True]


async def test_a_crashed_worker_leaves_the_other_serving_and_is_started_again(
    serve: ServeFactory,  # noqa: F811
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    script(upstream)
    served = await serve(5, "--workers", "2")
    victim = (await all_ready(http, served))[0]
    os.kill(victim, signal.SIGKILL)

    async def dead() -> bool:
        try:
            stat = os.read(fd := os.open(f"/proc/{victim}/stat", os.O_RDONLY), 4096)
            os.close(fd)
        except FileNotFoundError:
            return True
        return stat.split(b") ", 1)[1][:1] in (b"Z", b"X")  # a zombie: its sockets are closed

    # Connections the kernel handed to the worker as it died are reset, and for a moment
    # around its death and its restart a new connection may be too (as the SO_REUSEPORT group
    # changes): their clients retry once, as an SDK does. Every run is served, by the worker
    # left while the supervisor starts the other again.
    await eventually(dead, timeout=10, what="the killed worker gone")
    bodies = await asyncio.gather(*(one_run(served.url, retries=1) for _ in range(RUNS)))
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)

    assert victim not in await all_ready(http, served)
    text = await scrape(http, served)
    assert scraped_value(text, "sse_sidecar_worker_restarts_total") == 1
    assert scraped_value(text, "sse_sidecar_workers_up") == 2
    assert f"worker 0 (pid {victim}) exited with -9" in served.output()
    bodies = await asyncio.gather(*(one_run(served.url) for _ in range(RUNS)))
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    served.sigterm()
    assert await served.exit_code(30) == 0
