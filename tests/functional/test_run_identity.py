"""Run identity (DESIGN.md, "Run identity"): where a run id comes from, its validation, and
the rule that a run has one producer at a time, in this process and across sidecars."""

from __future__ import annotations

import json
import re
import uuid

import aiohttp
import pytest
import redis.asyncio

from sidecar.app import WRITER
from sidecar.keys import RunId
from tests.conftest import Gate, Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    ClientView,
    eventually,
    meta,
    payloads,
    read_events,
    redis_keys,
    stop,
    stored,
    stream,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"


def assert_json_error(view: ClientView, status: int, type_: str) -> dict[str, str]:
    assert view.status == status
    assert view.headers["Content-Type"].startswith("application/json")
    assert "X-Sidecar-Run-Id" not in view.headers
    doc = json.loads(view.body)
    assert set(doc) == {"error"}
    assert doc["error"]["type"] == type_
    assert isinstance(doc["error"]["message"], str)
    assert doc["error"]["message"]
    return dict(doc["error"])


async def assert_whole_run(
    redis_client: redis.asyncio.Redis, run_id: str, contents: list[str], status: str = "completed"
) -> dict[str, str]:
    """The stored run is exactly: a token per ``contents``, end_turn, [DONE]; seq 1..N."""
    rows = await stored(redis_client, RunId(run_id))
    n = len(contents) + 2
    assert [r["id"] for r in rows] == [f"{i}-0" for i in range(1, n + 1)]
    assert [r["seq_id"] for r in rows] == [str(i) for i in range(1, n + 1)]
    assert [r["complete"] for r in rows] == ["false"] * (n - 1) + ["true"]
    docs = [json.loads(r["data"].split("data: ", 1)[1]) for r in rows[:-1]]
    assert [d.get("content") for d in docs[:-1]] == contents
    assert docs[-1]["stop_reason"] == "end_turn"
    assert [d["run_id"] for d in docs] == [run_id] * (n - 1)
    assert [d["seq_id"] for d in docs] == list(range(1, n))
    assert rows[-1]["data"] == f"id: {n}\ndata: [DONE]\n\n"
    m = await meta(redis_client, RunId(run_id))
    assert m["status"] == status
    assert m["last_seq"] == str(n)
    return m


def run_keys(run_id: str) -> list[str]:
    return [f"sse:run:{{{run_id}}}", f"sse:run:{{{run_id}}}:meta"]


# -- where the id comes from ----------------------------------------------------------------


async def test_upstream_run_id_header_wins_over_the_clients(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE], headers={"X-Run-Id": "run-up.1"})
    view = await stream(http, sidecar.url + PATH, headers={"X-Run-Id": "run-client-1"})
    assert view.status == 200
    assert view.headers["X-Sidecar-Run-Id"] == "run-up.1"
    assert upstream.requests[0].headers["X-Run-Id"] == "run-client-1"  # forwarded as it came
    await sidecar.flushed()
    assert [p["run_id"] for p in payloads(view.events)[:-1]] == ["run-up.1", "run-up.1"]
    assert await redis_keys(redis_client) == run_keys("run-up.1")
    await assert_whole_run(redis_client, "run-up.1", ["a"])


async def test_client_run_id_header_wins_over_a_generated_one(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    run_id = "Client_run:7.a-b"
    upstream.sse(PATH, [token("a"), token("b"), stop("end_turn"), DONE])
    view = await stream(http, sidecar.url + PATH, headers={"X-Run-Id": run_id})
    assert view.status == 200
    assert view.headers["X-Sidecar-Run-Id"] == run_id
    await sidecar.flushed()
    assert await redis_keys(redis_client) == run_keys(run_id)
    await assert_whole_run(redis_client, run_id, ["a", "b"])


async def test_without_any_run_id_one_is_generated(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    first = await stream(http, sidecar.url + PATH)
    second = await stream(http, sidecar.url + PATH)
    ids = [first.headers["X-Sidecar-Run-Id"], second.headers["X-Sidecar-Run-Id"]]
    for run_id in ids:
        assert re.fullmatch(
            r"run-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", run_id
        )
        assert uuid.UUID(run_id.removeprefix("run-")).version == 4
    assert ids[0] != ids[1]
    await sidecar.flushed()
    assert await redis_keys(redis_client) == sorted(run_keys(ids[0]) + run_keys(ids[1]))
    for run_id in ids:
        await assert_whole_run(redis_client, run_id, ["a"])


async def test_longest_valid_run_id_is_accepted(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    run_id = "r" * 128
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    view = await stream(http, sidecar.url + PATH, headers={"X-Run-Id": run_id})
    assert view.headers["X-Sidecar-Run-Id"] == run_id
    await sidecar.flushed()
    await assert_whole_run(redis_client, run_id, ["a"])


@pytest.mark.parametrize(
    "bad", ["a b", "x" * 129, "a{b}", "", "run/1", "run*", "{x}", "a\tb", "ab%2F"]
)
async def test_invalid_client_run_id_is_400_before_any_upstream_request(
    bad: str,
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    view = await stream(http, sidecar.url + PATH, headers={"X-Run-Id": bad})
    assert_json_error(view, 400, "invalid_run_id")
    assert upstream.requests == []
    assert await redis_keys(redis_client) == []
    assert sidecar.metric("sse_sidecar_runs_started_total", route="proxy") == 0


@pytest.mark.parametrize("client_id", [None, "client-run"])
@pytest.mark.parametrize("bad", ["bad id", "x" * 129, "a{b}"])
async def test_invalid_upstream_run_id_is_ignored(
    bad: str,
    client_id: str | None,
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE], headers={"X-Run-Id": bad})
    headers = {"X-Run-Id": client_id} if client_id else {}
    view = await stream(http, sidecar.url + PATH, headers=headers)
    assert view.status == 200
    run_id = view.headers["X-Sidecar-Run-Id"]
    if client_id is None:
        assert run_id.startswith("run-")
        assert uuid.UUID(run_id.removeprefix("run-")).version == 4
    else:
        assert run_id == client_id
    await sidecar.flushed()
    assert await redis_keys(redis_client) == run_keys(run_id)
    await assert_whole_run(redis_client, run_id, ["a"])


# -- one producer per run -------------------------------------------------------------------


async def test_second_producer_in_the_same_process_is_409(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    async with http.post(sidecar.url + PATH, headers={"X-Run-Id": "dup"}) as first:
        assert first.headers["X-Sidecar-Run-Id"] == "dup"
        head = await read_events(first, 1)
        await gate.reached.wait()
        second = await stream(http, sidecar.url + PATH, headers={"X-Run-Id": "dup"})
        assert_json_error(second, 409, "run_conflict")
        assert len(upstream.requests) == 1  # refused before it reached the upstream
        gate.open()
        body = head + await first.read()
    await sidecar.flushed()
    m = await assert_whole_run(redis_client, "dup", ["a", "b"])
    assert body == "".join(r["data"] for r in await stored(redis_client, RunId("dup"))).encode()
    assert m["forced_done"] == ""
    assert sidecar.metric("sse_sidecar_runs_started_total", route="proxy") == 1


async def test_upstream_chosen_id_of_a_running_run_is_409(
    upstream: Upstream,
    sidecar: Sidecar,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    upstream.sse("/v1/other", [token("z"), stop("end_turn"), DONE], headers={"X-Run-Id": "dup"})
    async with http.post(sidecar.url + PATH, headers={"X-Run-Id": "dup"}) as first:
        head = await read_events(first, 1)
        await gate.reached.wait()
        second = await stream(http, sidecar.url + "/v1/other")
        assert_json_error(second, 409, "run_conflict")
        gate.open()
        body = head + await first.read()
    await sidecar.flushed()
    await assert_whole_run(redis_client, "dup", ["a", "b"])
    assert b'"z"' not in body


async def test_with_run_id_reuse_replace_a_finished_run_id_can_be_used_again(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sidecar = await make_sidecar(run_id_reuse="replace")
    upstream.sse("/v1/one", [token("a"), token("b"), token("c")])  # ends badly: error meta
    upstream.sse("/v1/two", [token("x"), stop("end_turn"), DONE])
    first = await stream(http, sidecar.url + "/v1/one", headers={"X-Run-Id": "again"})
    assert first.status == 200
    await sidecar.flushed()
    old = await meta(redis_client, RunId("again"))
    assert old["status"] == "failed"
    assert old["forced_done"] == "stream_incomplete"
    assert "error" in old
    assert old["last_seq"] == "6"
    second = await stream(http, sidecar.url + "/v1/two", headers={"X-Run-Id": "again"})
    assert second.status == 200
    assert second.headers["X-Sidecar-Run-Id"] == "again"
    await sidecar.flushed()
    new = await assert_whole_run(redis_client, "again", ["x"])
    assert (
        second.body
        == "".join(r["data"] for r in await stored(redis_client, RunId("again"))).encode()
    )
    assert new["forced_done"] == ""
    assert new["stop_reason"] == "end_turn"
    assert "error" not in new  # the old run's meta is gone, not merged
    assert new["producer"] != old["producer"]
    assert new["generation"] != old["generation"]
    assert int(new["created_ms"]) >= int(old["finished_ms"])
    assert sidecar.metric("sse_sidecar_run_id_reuse_total", outcome="replaced") == 1


async def test_a_second_sidecar_gets_409_for_a_run_the_first_is_producing(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    one = await make_sidecar()
    two = await make_sidecar(run_id_reuse="replace")
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    upstream.sse("/v1/other", [token("z"), stop("end_turn"), DONE])
    async with http.post(one.url + PATH, headers={"X-Run-Id": "shared"}) as first:
        head = await read_events(first, 1)
        await gate.reached.wait()

        async def claimed() -> bool:
            return "producer" in await meta(redis_client, RunId("shared"))

        # The first byte does not wait on Redis: the claim lands with the writer's round trip.
        await eventually(claimed, what="the first sidecar's claim in Redis")
        producer = (await meta(redis_client, RunId("shared")))["producer"]
        second = await stream(http, two.url + "/v1/other", headers={"X-Run-Id": "shared"})
        err = assert_json_error(second, 409, "run_conflict")
        assert err["producer"] == producer
        assert two.metric("sse_sidecar_runs_started_total", route="proxy") == 0
        gate.open()
        body = head + await first.read()
    await one.flushed()
    await two.flushed()
    m = await assert_whole_run(redis_client, "shared", ["a", "b"])
    assert m["producer"] == producer
    assert b'"z"' not in body
    # Once the first sidecar finished the run, the second may produce it anew.
    third = await stream(http, two.url + "/v1/other", headers={"X-Run-Id": "shared"})
    assert third.status == 200
    await two.flushed()
    await assert_whole_run(redis_client, "shared", ["z"])


async def test_an_upstream_x_sidecar_run_id_header_is_replaced(
    upstream: Upstream, sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    upstream.sse(
        PATH,
        [token("a"), stop("end_turn"), DONE],
        headers={"X-Sidecar-Run-Id": "spoofed", "X-Run-Id": "real-run"},
    )
    async with http.post(sidecar.url + PATH) as resp:
        assert resp.headers.getall("X-Sidecar-Run-Id") == ["real-run"]
        assert resp.headers["X-Run-Id"] == "real-run"
        await resp.read()
    await sidecar.flushed()


async def test_a_run_id_can_be_reused_as_soon_as_the_run_finished(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sidecar = await make_sidecar(run_id_reuse="replace")
    after_done = Gate()
    # The upstream keeps its response open a little after [DONE], as servers may.
    upstream.sse("/v1/one", [token("a"), stop("end_turn"), DONE, after_done])
    upstream.sse("/v1/two", [token("b"), stop("end_turn"), DONE])
    try:
        first = await stream(http, sidecar.url + "/v1/one", headers={"X-Run-Id": "quick"})
        assert first.body.endswith(b"id: 3\ndata: [DONE]\n\n")  # the client saw the run end
        assert await sidecar.app[WRITER].flush(5)
        assert (await meta(redis_client, RunId("quick")))["status"] == "completed"
        # A new connection: the first one is still busy with the settling handler.
        async with aiohttp.ClientSession() as other:
            second = await stream(other, sidecar.url + "/v1/two", headers={"X-Run-Id": "quick"})
    finally:
        after_done.open()
    assert second.status == 200, second.body
    await sidecar.flushed()
    await assert_whole_run(redis_client, "quick", ["b"])
