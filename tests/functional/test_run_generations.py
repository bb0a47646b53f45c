"""Run-id reuse and generations (issue 11, case 5).

A run id that is used again starts a new *generation* of the run; a per-run token names the one
generation it was issued for, so the old owner's token reads nothing of the new run (403). By
default a client-chosen run id that names a stored run is refused (409 ``run_exists``, the upstream
request closed before any byte is relayed); ``run_id_reuse=replace`` lets it replace the stored
run. An id the
upstream chose is replaced whatever the setting: the upstream has done the work already.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import redis.asyncio
from aiohttp import web

from sidecar.keys import RunId
from sidecar.store.runstore import APPEND_SCRIPT
from tests.conftest import Gate, Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    LiveReader,
    meta,
    stop,
    stored,
    stream,
    token,
    write_run,
)
from tests.functional.test_replay_auth import FORBIDDEN, bearer, refusal, routes
from tests.functional.test_writer import quad, run_script

REUSE = "sse_sidecar_run_id_reuse_total"
TOKEN_HEADER = "X-Sidecar-Replay-Token"
GENERATION_FORBIDDEN = {
    "error": {
        "type": "forbidden",
        "message": "this token is for an earlier run that had the same run id",
    }
}


def steps(n: int) -> list[bytes]:
    return [*(token(f"t{i}") for i in range(n)), stop("end_turn"), DONE]


async def start_finished(
    sc: Sidecar, upstream: Upstream, http: aiohttp.ClientSession, path: str, n: int, **kw: str
) -> tuple[str, str]:
    """A finished run of n tokens through ``path``; its run id and per-run token."""
    upstream.sse(path, steps(n), headers=kw or None)
    view = await stream(http, sc.url + path, json={}, headers={"X-Run-Id": "reused"})
    assert view.status == 200, view.body
    await sc.flushed()
    return view.run_id, view.headers[TOKEN_HEADER]


async def test_a_client_chosen_run_id_that_is_stored_is_refused_and_the_upstream_stopped(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k")
    run_id, old_token = await start_finished(sc, upstream, http, "/v1/one", 5)
    before = await stored(redis_client, RunId(run_id))
    stopped = asyncio.Event()

    async def generating(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:  # an LLM generating until it is told to stop
                await resp.write(token("t0"))
                await asyncio.sleep(0.01)
        except ConnectionError:
            stopped.set()
        return resp

    upstream.raw("/v1/two", generating)
    view = await stream(http, sc.url + "/v1/two", json={}, headers={"X-Run-Id": "reused"})
    assert refusal(view) == (
        409,
        {
            "error": {
                "type": "run_exists",
                "message": "run 'reused' is stored already: a new run needs a new run id",
            }
        },
    )
    # The claim is decided once the upstream answered; its request is closed at once (that is
    # what tells an LLM service to stop), and none of its bytes reach the client.
    await asyncio.wait_for(stopped.wait(), 5)
    assert b"t0" not in view.body
    assert await stored(redis_client, RunId(run_id)) == before  # the 7 events are all there
    assert sc.metric(REUSE, outcome="refused") == 1
    assert sc.metric(REUSE, outcome="replaced") == 0
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 1
    status = await stream(
        http, f"{sc.url}/sidecar/v1/runs/{run_id}", method="GET", headers=bearer(old_token)
    )
    assert (status.status, json.loads(status.body)["last_seq"]) == (200, 7)


async def test_the_claim_refuses_atomically_when_the_id_is_taken_while_the_upstream_works(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()

    async def slow(request: web.Request) -> web.StreamResponse:
        gate.reached.set()
        await gate.event.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(token("late") + DONE)
        return resp

    upstream.raw("/v1/slow", slow)
    request = asyncio.ensure_future(
        stream(http, sc.url + "/v1/slow", headers={"X-Run-Id": "raced"})
    )
    await gate.reached.wait()  # nothing stored under the id when the request came
    winner = [b'id: 1\ndata: {"message_type":"assistant_message"}\n\n']
    await write_run(redis_client, RunId("raced"), winner, {"status": "completed"})
    gate.open()
    view = await request
    assert refusal(view)[0] == 409
    assert refusal(view)[1]["error"]["type"] == "run_exists"
    assert [r["data"] for r in await stored(redis_client, RunId("raced"))] == [winner[0].decode()]
    assert sc.metric(REUSE, outcome="refused") == 1
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 0


async def test_with_replace_the_old_owners_token_opens_nothing_of_the_new_generation(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k", run_id_reuse="replace")
    run_id, old_token = await start_finished(sc, upstream, http, "/v1/one", 5)
    old_generation = (await meta(redis_client, RunId(run_id)))["generation"]
    _, new_token = await start_finished(sc, upstream, http, "/v1/two", 11)
    m = await meta(redis_client, RunId(run_id))
    assert m["generation"] != old_generation
    assert m["last_seq"] == "13"
    assert new_token.split(".")[1] == m["generation"]
    assert old_token.split(".")[1] == old_generation
    assert sc.metric(REUSE, outcome="replaced") == 1
    for method, path in routes(run_id):
        view = await stream(http, sc.url + path, method=method, headers=bearer(old_token))
        assert refusal(view) == (403, GENERATION_FORBIDDEN), (method, path)
        view = await stream(http, sc.url + path, method=method, params={"token": old_token})
        assert refusal(view) == (403, GENERATION_FORBIDDEN), (method, path)
    # The new owner reads the new run (cancel: 409, it has ended).
    for method, path in routes(run_id)[:4]:
        view = await stream(http, sc.url + path, method=method, headers=bearer(new_token))
        assert view.status == 200, (method, path)
    # Another run's token is still "another run", whatever the generations.
    view = await stream(
        http, f"{sc.url}/sidecar/v1/runs/other", method="GET", headers=bearer(new_token)
    )
    assert refusal(view) == (403, FORBIDDEN)


async def test_an_old_generations_token_cannot_cancel_the_running_new_one(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k", run_id_reuse="replace")
    run_id, old_token = await start_finished(sc, upstream, http, "/v1/one", 2)
    gate = Gate()
    upstream.sse("/v1/live", [token("a"), gate, stop("end_turn"), DONE])
    cancel = f"{sc.url}/sidecar/v1/runs/{run_id}/cancel"
    async with http.post(sc.url + "/v1/live", headers={"X-Run-Id": run_id}) as resp:
        live = LiveReader(resp)
        await live.until(1)
        assert refusal(await stream(http, cancel, headers=bearer(old_token))) == (
            403,
            GENERATION_FORBIDDEN,
        )
        assert (await meta(redis_client, RunId(run_id)))["status"] == "running"
        view = await stream(http, cancel, headers=bearer(resp.headers[TOKEN_HEADER]))
        assert (view.status, json.loads(view.body)["status"]) == (200, "cancelled")
        await live.rest()
    gate.open()


async def test_an_upstream_chosen_run_id_is_replaced_even_when_reuse_is_refused(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(signing_key="k")
    assert sc.settings.run_id_reuse == "refuse"
    for path, n in (("/v1/one", 5), ("/v1/two", 11)):
        upstream.sse(path, steps(n), headers={"X-Run-Id": "up-1"})
    first = await stream(http, sc.url + "/v1/one", json={})
    await sc.flushed()
    second = await stream(http, sc.url + "/v1/two", json={})
    await sc.flushed()
    assert (first.run_id, second.run_id, second.status) == ("up-1", "up-1", 200)
    assert len(await stored(redis_client, RunId("up-1"))) == 13
    assert sc.metric(REUSE, outcome="replaced") == 1
    assert sc.metric(REUSE, outcome="refused") == 0
    old = await stream(
        http,
        f"{sc.url}/sidecar/v1/runs/up-1/stream",
        method="GET",
        headers=bearer(first.headers[TOKEN_HEADER]),
    )
    assert refusal(old) == (403, GENERATION_FORBIDDEN)
    new = await stream(
        http,
        f"{sc.url}/sidecar/v1/runs/up-1/stream",
        method="GET",
        headers=bearer(second.headers[TOKEN_HEADER]),
    )
    assert (new.status, new.body) == (200, second.body)


async def test_the_append_scripts_claim_modes(redis_client: redis.asyncio.Redis) -> None:
    # claim "2" takes only a run id nothing is stored under; "1" replaces a finished run and
    # says so; neither takes a run whose producer holds a live lease.
    await redis_client.script_load(APPEND_SCRIPT)
    run_id = RunId("claims")

    def claim(producer: str, mode: str, generation: str) -> list[object]:
        head = [producer, mode, "30000", "60000", "100000", 0, "0", "0", 2, "status", "running"]
        return [*head, "generation", generation, *quad(1)]

    # {0, added, trimmed, last_seq, rebuilt, replaced, rolled_back}
    assert await run_script(redis_client, run_id, *claim("p1", "2", "g1")) == [0, 1, 0, 1, 0, 0, 0]
    # p1 still holds a live lease: every mode is refused with the holder.
    assert await run_script(redis_client, run_id, *claim("p2", "1", "g2")) == [-1, b"p1"]
    await redis_client.hset(f"sse:run:{{{run_id}}}:meta", "status", "completed")
    assert await run_script(redis_client, run_id, *claim("p2", "2", "g2")) == [-4, b"completed"]
    assert (await meta(redis_client, run_id))["generation"] == "g1"
    assert await run_script(redis_client, run_id, *claim("p2", "1", "g2")) == [0, 1, 0, 1, 0, 1, 0]
    m = await meta(redis_client, run_id)
    assert (m["generation"], m["producer"], m["status"]) == ("g2", "p2", "running")
