"""An upstream that sends an error event and then goes silent (no [DONE], connection open): the
live client must hear from the sidecar while it waits (comment keep-alives), until the upstream
read timeout ends the run with its terminal (issue 10, failure 7: 300 s with nothing sent)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.conftest import HANG, Upstream
from tests.faults.conftest import DirectFactory, RedisFactory
from tests.faults.harness import SidecarFactory, check_terminal, label, numbered, split_raw, stored
from tests.functional.helpers import error, token

PATH = "/v1/agents/stall/messages/stream"
READ_TIMEOUT = 4.0
KEEPALIVE = 1.0


@pytest.mark.timeout(60)
async def test_upstream_silent_after_an_error_event_gets_keepalives(
    make_redis: RedisFactory,
    direct: DirectFactory,
    sidecars: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis(aof=True)
    client = direct(redis)
    upstream.sse(PATH, [token("a"), token("b"), error("model overloaded"), HANG])
    a = await sidecars(
        "a",
        redis.url,
        upstream_read_timeout_seconds=READ_TIMEOUT,
        heartbeat_seconds=KEEPALIVE,
    )
    chunks: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with http.post(a.url + PATH, json={}) as resp:
        assert resp.status == 200
        run_id = resp.headers["X-Sidecar-Run-Id"]
        async for chunk in resp.content.iter_any():
            chunks.append((time.monotonic() - started, chunk))
    body = b"".join(c for _, c in chunks)
    live = numbered(split_raw(body))
    check_terminal(live, "live")
    said = [label(live[s]) for s in sorted(live)]
    assert said[:3] == ["a", "b", "error:llm_error"]
    await a.settled(http)
    run = await stored(client, run_id)
    assert run.entries == live  # keep-alives are comments: relayed, never stored
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", "upstream_timeout")
    # While the upstream was silent the client heard a comment at least every keep-alive
    # interval (bounded above by the read timeout, after which the run ended).
    silent = [t for t, c in chunks if c.startswith(b":")]
    assert len(silent) >= int(READ_TIMEOUT / KEEPALIVE) - 1, chunks
