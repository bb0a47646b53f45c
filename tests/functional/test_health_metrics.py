"""The metrics the outage alerts stand on (dashboards/prometheus/alerts.yaml):

- ``sse_sidecar_redis_up``: a probe every ``redis_probe_seconds`` (one GET of the epoch key),
  so an idle replica (nothing to flush, so no flush errors) says whether it reaches Redis;
- ``sse_sidecar_writer_max_bytes``: the configured bound, so the backlog alert is a ratio of it;
- ``sse_sidecar_upstream_errors_total{kind}``: the proxied requests the sidecar answered 502 or
  504 itself because the upstream gave no response.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sidecar.telemetry import UPSTREAM_ERROR_KINDS
from tests.conftest import Gate, RedisServer, Sidecar, SidecarFactory, Upstream, free_port
from tests.functional.helpers import eventually, stream


def _upstream_errors(sc: Sidecar) -> dict[str, float]:
    return {
        kind: sc.metric("sse_sidecar_upstream_errors_total", kind=kind)
        for kind in UPSTREAM_ERROR_KINDS
    }


async def _redis_up(sc: Sidecar, expected: float) -> None:
    async def check() -> bool:
        return sc.metric("sse_sidecar_redis_up") == expected

    await eventually(check, timeout=5.0, what=f"sse_sidecar_redis_up == {expected}")


async def test_redis_up_follows_redis_on_an_idle_replica(
    make_sidecar: SidecarFactory, restartable_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(
        redis_url=restartable_redis.url,
        redis_probe_seconds=0.05,
        redis_timeout_seconds=0.5,
    )
    await _redis_up(sc, 1.0)
    restartable_redis.stop()
    await _redis_up(sc, 0.0)
    # Nothing was written: the writer has no error to report, the probe does.
    assert sc.metric("sse_sidecar_flushes_total", outcome="error") == 0
    assert sc.metric("sse_sidecar_flushes_total", outcome="ok") == 0
    async with http.get(sc.admin_url + "/metrics") as resp:
        assert "sse_sidecar_redis_up 0.0\n" in await resp.text()
    restartable_redis.start()
    await _redis_up(sc, 1.0)


async def test_the_writer_bound_is_exported(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(writer_max_bytes=32768)
    async with http.get(sc.admin_url + "/metrics") as resp:
        assert "sse_sidecar_writer_max_bytes 32768.0\n" in await resp.text()


async def test_an_unreachable_upstream_is_counted_as_connect(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{free_port()}")
    for _ in range(3):
        view = await stream(http, sc.url + "/v1/anything", json={})
        assert view.status == 502
    assert _upstream_errors(sc) == {"connect": 3, "timeout": 0, "disconnected": 0}
    assert (
        sc.metric("sse_sidecar_http_requests_total", route="proxy", method="POST", code="502") == 3
    )


async def test_an_upstream_silent_before_its_headers_is_counted_as_timeout(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(upstream_read_timeout_seconds=0.2)
    gate = Gate()

    async def silent(request: web.Request) -> web.StreamResponse:
        await gate.event.wait()
        return web.Response(text="too late")

    upstream.raw("/v1/slow", silent)
    try:
        view = await stream(http, sc.url + "/v1/slow")
    finally:
        gate.open()
    assert view.status == 504
    assert _upstream_errors(sc) == {"connect": 0, "timeout": 1, "disconnected": 0}


async def test_an_upstream_that_hangs_up_before_its_headers_is_counted_as_disconnected(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()

    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response(text="never sent")

    upstream.raw("/v1/hangup", hang_up)
    view = await stream(http, sc.url + "/v1/hangup")
    assert view.status == 502
    assert _upstream_errors(sc) == {"connect": 0, "timeout": 0, "disconnected": 1}
    # The upstream's own answers, 5xx included, are not upstream errors.
    upstream.json("/v1/broken", {"error": "boom"}, status=503)
    assert (await stream(http, sc.url + "/v1/broken")).status == 503
    assert _upstream_errors(sc) == {"connect": 0, "timeout": 0, "disconnected": 1}
