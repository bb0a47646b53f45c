"""Pacing (sidecar/pace.py): a burst the writer cannot keep up with, in a process out of CPU, is
stored whole: the tees hold their upstream reads while the writer catches up, instead of
relaying past ``writer_max_bytes`` and dropping. Everything here runs in the test's one process
(upstream, sidecar, clients), so that process is out of CPU while the burst lasts, with a real
Redis that answers at once.

It failed now and then in two ways, both fixed, and was kept out of ``make test`` meanwhile: a
run's whole body reached its tee before the pacer's next tick, in one long loop turn (now the
tee that asks judges a late tick), and a machine whose other processes took the cores gave
this process under 90 % of a core, so it never counted as out of CPU (now a loop whose thread
never blocked in a tick counts as busy; with two CPU hogs running it failed 8 runs of 8
before, and passed 6 of 6 after)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from sidecar.keys import Keys, RunId
from tests.conftest import Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import DONE, stop, stream

P = "sse_sidecar_"
RUNS = 16
EVENTS = 16_000  # per run, ~70 bytes each: ~18 MB in all, as fast as the upstream writes them
PER_WRITE = 400  # events per upstream write
BOUND = 4 << 20  # writer_max_bytes: a fraction of the burst
# The clients read in the same process as the tees write: they fall behind too, and are not
# what this is about.
CLIENT_BOUND = 64 << 20


def burst_route(upstream: Upstream) -> None:
    """``/burst``: EVENTS Letta-style events as fast as the connection takes them, then a stop
    reason and [DONE]."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for start in range(0, EVENTS, PER_WRITE):
            await resp.write(
                b"".join(
                    b'data: {"message_type":"assistant_message","content":"t%d"}\n\n' % i
                    for i in range(start, min(start + PER_WRITE, EVENTS))
                )
            )
        await resp.write(stop("end_turn") + DONE)
        await resp.write_eof()
        return resp

    upstream.routes["/burst"] = handler


Burst = Callable[..., Awaitable[tuple[Sidecar, list[bytes], list[int]]]]


@pytest.fixture
def burst(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> Burst:
    """RUNS runs at once through a sidecar with these settings: the sidecar, each client's
    body, and each run's stored entry count once the writer is done."""
    burst_route(upstream)

    async def run(**settings: Any) -> tuple[Sidecar, list[bytes], list[int]]:
        sc = await make_sidecar(writer_max_bytes=BOUND, live_buffer_bytes=CLIENT_BOUND, **settings)
        ids = [RunId(f"burst-{i}") for i in range(RUNS)]
        views = await asyncio.gather(
            *(stream(http, sc.url + "/burst", method="GET", headers={"X-Run-Id": r}) for r in ids)
        )
        await sc.flushed(timeout=30)
        lengths = [await redis_client.xlen(Keys().stream(r)) for r in ids]
        return sc, [v.body for v in views], lengths

    return run


@pytest.mark.timeout(120)
async def test_a_burst_past_the_writer_bound_is_paced_and_stored_whole(
    burst: Burst, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc, bodies, lengths = await burst()
    # Every client got every event, and every event was stored: none dropped.
    assert [b.count(b"\n\n") for b in bodies] == [EVENTS + 2] * RUNS
    assert lengths == [EVENTS + 2] * RUNS
    assert sc.metric(P + "writer_dropped_events_total") == 0
    assert sc.metric(P + "upstream_paced_seconds_total") > 0
    # The held connections were given back reading: a run after the burst goes through them.
    upstream.sse("/after", [stop("end_turn"), DONE])
    after = await stream(http, sc.url + "/after", method="GET")
    assert after.status == 200
    assert after.body.endswith(b"data: [DONE]\n\n")


@pytest.mark.timeout(120)
async def test_without_pacing_the_same_burst_drops_events(burst: Burst) -> None:
    """The case above is one pacing decides: with it off, the writer's bound overflows."""
    sc, bodies, lengths = await burst(writer_pace_bytes=0)
    assert [b.count(b"\n\n") for b in bodies] == [EVENTS + 2] * RUNS  # the clients lose nothing
    dropped = sc.metric(P + "writer_dropped_events_total", reason="overflow")
    assert dropped > 0
    assert sum(lengths) == RUNS * (EVENTS + 2) - dropped
    assert sc.metric(P + "upstream_paced_seconds_total") == 0
