"""Who may replay, read the status of, or cancel a run (DESIGN.md "The API", Auth).

With ``replay_token`` the replay, status and cancel routes need ``Authorization: Bearer`` (or
``?token=``); with ``signing_key`` the tee hands the client a per-run token in
``X-Sidecar-Replay-Token``. A refused request reads nothing: no run is looked up, none is ended.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.auth import Verdict, check_run_token, make_run_token
from sidecar.keys import RunId
from tests.conftest import Gate, Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import (
    DONE,
    ClientView,
    LiveReader,
    meta,
    replay_outcomes,
    stop,
    stored,
    stream,
    token,
    write_run,
)

PATH = "/v1/agents/agent-1/messages/stream"
P = "sse_sidecar_"
TOKEN_HEADER = "X-Sidecar-Replay-Token"
STEPS: list[Step] = [token("a"), token("b"), stop("end_turn"), DONE]


def outcomes(sc: Sidecar) -> dict[str, float]:
    return replay_outcomes(sc.metrics.registry)


def routes(run_id: str) -> list[tuple[str, str]]:
    """(method, path) of every route that needs authorization, for ``run_id``."""
    return [
        ("GET", f"/sidecar/v1/runs/{run_id}/stream"),
        ("POST", f"/sidecar/v1/runs/{run_id}/stream"),
        ("POST", f"/v1/runs/{run_id}/stream"),
        ("GET", f"/sidecar/v1/runs/{run_id}"),
        ("POST", f"/sidecar/v1/runs/{run_id}/cancel"),
    ]


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def both_ways(tok: str) -> list[dict[str, Any]]:
    """Request kwargs presenting ``tok`` as a bearer token, and as ``?token=``."""
    return [{"headers": bearer(tok)}, {"params": {"token": tok}}]


def refusal(view: ClientView) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = json.loads(view.body)
    return view.status, body


def unauthorized(reason: str) -> dict[str, Any]:
    message = f"a valid bearer token is required ({reason})"
    return {"error": {"type": "unauthorized", "message": message}}


FORBIDDEN = {"error": {"type": "forbidden", "message": "this token is for another run"}}


async def finished(
    upstream: Upstream, http: aiohttp.ClientSession, sc: Sidecar, path: str = PATH
) -> ClientView:
    upstream.sse(path, STEPS)
    view = await stream(http, sc.url + path, json={})
    assert view.status == 200
    await sc.flushed()
    return view


async def orphan(redis_client: redis.asyncio.Redis, run_id: RunId) -> None:
    """A running run whose producer's lease ran out: any authorized look at it ends it."""
    now_ms = int(time.time() * 1000)
    raw = f'id: 1\ndata: {{"message_type":"assistant_message","seq_id":1,"run_id":"{run_id}"}}\n\n'
    await write_run(
        redis_client,
        run_id,
        [raw.encode()],
        {
            "status": "running",
            "producer": "gone:1:abc",
            "lease_until_ms": str(now_ms - 1000),
            "created_ms": str(now_ms - 2000),
            "updated_ms": str(now_ms - 2000),
        },
    )


async def test_a_shared_replay_token_guards_replay_status_and_cancel(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(replay_token="s3cret")
    live = await finished(upstream, http, sc)
    assert TOKEN_HEADER not in live.headers  # no signing key, no per-run token
    r = live.run_id
    refused = 0
    for method, path in routes(r):
        attempts: list[tuple[dict[str, Any], str]] = [
            ({}, "missing"),
            ({"headers": bearer("wrong")}, "invalid"),
            ({"headers": {"Authorization": "Basic s3cret"}}, "missing"),
            ({"params": {"token": "S3CRET"}}, "invalid"),
        ]
        for kwargs, reason in attempts:
            view = await stream(http, sc.url + path, method=method, **kwargs)
            assert refusal(view) == (401, unauthorized(reason)), (method, path, kwargs)
            refused += path.endswith("/stream")
    assert outcomes(sc) == {"unauthorized": refused}
    # The token as a bearer and as ?token=: the replays and the status work, and cancel gets
    # as far as saying the run is over.
    for creds in both_ways("s3cret"):
        for method, path in routes(r)[:3]:
            view = await stream(http, sc.url + path, method=method, **creds)
            assert (view.status, view.body) == (200, live.body), (method, path)
        view = await stream(http, f"{sc.url}/sidecar/v1/runs/{r}", method="GET", **creds)
        assert (view.status, json.loads(view.body)["status"]) == (200, "completed")
        view = await stream(http, f"{sc.url}/sidecar/v1/runs/{r}/cancel", **creds)
        assert refusal(view)[0] == 409
        assert refusal(view)[1]["error"]["type"] == "run_finished"
    assert outcomes(sc) == {"unauthorized": refused, "ok": 6.0}


async def test_authorization_comes_before_everything_but_the_run_id_check(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(replay_token="s3cret")
    live = await finished(upstream, http, sc)
    url = f"{sc.url}/sidecar/v1/runs/{live.run_id}/stream"
    # A bad cursor or body without a token: 401, not 400 (nothing is parsed for strangers).
    view = await stream(http, url, method="GET", headers={"Last-Event-ID": "-1"})
    assert refusal(view) == (401, unauthorized("missing"))
    view = await stream(http, url, data=b"{", headers={"Content-Type": "application/json"})
    assert refusal(view) == (401, unauthorized("missing"))
    # An unknown run without a token: 401, not 404 (no way to probe which runs exist).
    view = await stream(http, f"{sc.url}/sidecar/v1/runs/nope/stream", method="GET")
    assert refusal(view) == (401, unauthorized("missing"))
    view = await stream(http, f"{sc.url}/sidecar/v1/runs/nope", method="GET")
    assert refusal(view) == (401, unauthorized("missing"))
    # An invalid run id is refused first, as it must never reach anything else.
    view = await stream(http, f"{sc.url}/sidecar/v1/runs/bad%20id/stream", method="GET")
    assert refusal(view)[0] == 400
    assert refusal(view)[1]["error"]["type"] == "invalid_run_id"
    assert outcomes(sc) == {"unauthorized": 3.0, "bad_request": 1.0}


async def test_per_run_tokens_from_the_tee(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k")
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    upstream.sse("/other", [token("x"), stop("end_turn"), DONE])
    other = await stream(http, sc.url + "/other", json={})
    await sc.flushed()
    before = int(time.time())
    async with http.post(sc.url + PATH, json={}) as live_resp:
        after = int(time.time())
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        tok = live_resp.headers[TOKEN_HEADER]
        live = LiveReader(live_resp)
        await live.until(1)
        assert check_run_token("k", tok, run_id).verdict is Verdict.ALLOWED
        expiry = int(tok.split(".")[2])
        ttl = sc.settings.replay_token_ttl_seconds
        assert before + ttl <= expiry <= after + ttl
        # While the run is live: replay with the token as a bearer, and status with ?token=.
        async with http.get(
            f"{sc.url}/sidecar/v1/runs/{run_id}/stream", headers=bearer(tok)
        ) as resp:
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(1)
            status = await stream(
                http, f"{sc.url}/sidecar/v1/runs/{run_id}", method="GET", params={"token": tok}
            )
            assert (status.status, json.loads(status.body)["status"]) == (200, "running")
            gate.open()
            replayed = await reader.rest()
        live_body = await live.rest()
    assert replayed == live_body
    other_tok = other.headers[TOKEN_HEADER]
    assert other_tok != tok
    assert check_run_token("k", other_tok, other.run_id).verdict is Verdict.ALLOWED
    for method, path in routes(run_id)[:3]:
        for creds in both_ways(tok):
            view = await stream(http, sc.url + path, method=method, **creds)
            assert (view.status, view.body) == (200, live_body), (method, path)
    # Another run's token: 403 on every route, and nothing happens to either run.
    for method, path in routes(run_id):
        for creds in both_ways(other_tok):
            view = await stream(http, sc.url + path, method=method, **creds)
            assert refusal(view) == (403, FORBIDDEN), (method, path)
    # No token, a token signed with another key, one that expired: 401.
    forged = make_run_token("not-k", run_id, int(time.time()) + 600, generation="g")
    expired = make_run_token("k", run_id, int(time.time()) - 10, generation="g")
    for method, path in routes(run_id):
        for headers, reason in (({}, "missing"), (bearer(forged), "invalid")):
            view = await stream(http, sc.url + path, method=method, headers=headers)
            assert refusal(view) == (401, unauthorized(reason)), (method, path)
        for creds in both_ways(expired):
            view = await stream(http, sc.url + path, method=method, **creds)
            assert refusal(view) == (401, unauthorized("expired")), (method, path)
    # The shared replay token is not set, so the signing key itself opens nothing.
    view = await stream(
        http, f"{sc.url}/sidecar/v1/runs/{run_id}", method="GET", headers=bearer("k")
    )
    assert refusal(view) == (401, unauthorized("invalid"))
    assert outcomes(sc) == {"ok": 7.0, "forbidden": 6.0, "unauthorized": 12.0}
    assert sc.metric(P + "replay_events_total") == 7 * 4


async def test_cancel_with_the_runs_own_token_and_only_with_it(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k")
    gate_a, gate_b = Gate(), Gate()
    upstream.sse("/a", [token("a"), gate_a, stop("end_turn"), DONE])
    upstream.sse("/b", [token("b"), gate_b, stop("end_turn"), DONE])
    async with http.post(sc.url + "/a", json={}) as resp_a, http.post(sc.url + "/b") as resp_b:
        a, tok_a = RunId(resp_a.headers["X-Sidecar-Run-Id"]), resp_a.headers[TOKEN_HEADER]
        b, tok_b = RunId(resp_b.headers["X-Sidecar-Run-Id"]), resp_b.headers[TOKEN_HEADER]
        live_a, live_b = LiveReader(resp_a), LiveReader(resp_b)
        await live_a.until(1)
        await live_b.until(1)
        cancel_b = f"{sc.url}/sidecar/v1/runs/{b}/cancel"
        for creds in both_ways(tok_a):
            assert refusal(await stream(http, cancel_b, **creds)) == (403, FORBIDDEN)
        assert refusal(await stream(http, cancel_b)) == (401, unauthorized("missing"))
        assert (await meta(redis_client, b))["status"] == "running"
        view = await stream(http, cancel_b, params={"token": tok_b})
        assert view.status == 200
        assert (json.loads(view.body)["status"], json.loads(view.body)["forced_done"]) == (
            "cancelled",
            "cancelled",
        )
        body_b = await live_b.rest()
        assert body_b.endswith(b"data: [DONE]\n\n")
        gate_a.open()
        gate_b.open()
        body_a = await live_a.rest()
    await sc.flushed()
    assert b'"stop_reason":"end_turn"' in body_a  # run a was never touched
    assert (await meta(redis_client, a))["status"] == "completed"
    assert outcomes(sc) == {}


@pytest.mark.parametrize("setting", ["replay_token", "signing_key"])
async def test_nothing_is_read_when_refused(
    setting: str,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # A run whose producer died (only the orphan sweep ends it; a reader never writes).
    sc = await make_sidecar(**{setting: "s3cret"})
    r = RunId("orphan-guarded")
    await orphan(redis_client, r)
    before = await meta(redis_client, r)
    other = make_run_token("s3cret", "some-other-run", int(time.time()) + 600, generation="g")
    expired = make_run_token("s3cret", r, int(time.time()) - 1, generation="g")
    for method, path in routes(r):
        for headers in ({}, bearer("wrong"), bearer(other), bearer(expired)):
            view = await stream(http, sc.url + path, method=method, headers=headers)
            assert view.status in (401, 403), (method, path, headers)
    assert await meta(redis_client, r) == before
    assert len(await stored(redis_client, r)) == 1
    assert sc.metric(P + "forced_done_total", reason="producer_lost") == 0
    found = outcomes(sc)
    assert "ok" not in found
    assert sum(found.values()) == 3 * 4
    assert set(found) <= {"unauthorized", "forbidden"}
    # The same look, authorized, reads it.
    # (orphan() stores a run without a generation, as runs from before generations are.)
    good = (
        "s3cret"
        if setting == "replay_token"
        else make_run_token("s3cret", r, 2**40, generation="g")
    )
    view = await stream(http, f"{sc.url}/sidecar/v1/runs/{r}", method="GET", headers=bearer(good))
    assert (view.status, json.loads(view.body)["status"]) == (200, "running")
