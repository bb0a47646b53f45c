"""Dialects through a real sidecar: the generic dialect's ends (nothing appended, the client's
connection cut on a failure, a stored end without bytes, EventSource stopping at it), ``auto``
without any event, per-route overrides, metrics that pair per dialect, and the orphan finalizer
ending a run whose producer process was killed, in that run's own dialect.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio

from sidecar.keys import RunId
from sidecar.terminal import Dialect
from tests.conftest import RESET, Gate, Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import (
    ClientView,
    LiveReader,
    data,
    eventually,
    forced_total,
    stored_run,
)
from tests.functional.test_replay_eventsource import EventSource, ReadyState
from tests.functional.test_replicas import ReplicaFactory, replicas  # noqa: F401 (a fixture)

P = "sse_sidecar_"


async def generic_run(
    http: aiohttp.ClientSession, demo_sidecar: Sidecar, scenario: str
) -> tuple[RunId, bytes, BaseException | None]:
    """A demo ``GET /v1/events`` stream through the sidecar: its run id, the bytes the client got,
    and how its response ended (None: cleanly)."""
    url = f"{demo_sidecar.url}/v1/events?scenario={scenario}&tokens=3&delay_ms=0"
    async with http.get(url) as resp:
        assert resp.status == 200
        reader = LiveReader(resp)
        try:
            await reader.rest()
        except aiohttp.ClientPayloadError as exc:
            return RunId(resp.headers["X-Sidecar-Run-Id"]), reader.body, exc
    return RunId(resp.headers["X-Sidecar-Run-Id"]), reader.body, None


EVENTS = b"id: 1\ndata: Server-sent\n\nid: 2\ndata: events\n\nid: 3\ndata: carry\n\n"


async def test_generic_clean_close_is_a_natural_end_stored_with_an_end_without_bytes(
    demo_sidecar: Sidecar, http: aiohttp.ClientSession, redis_client: redis.asyncio.Redis
) -> None:
    run_id, body, cut = await generic_run(http, demo_sidecar, "normal")
    assert cut is None
    assert body == EVENTS  # nothing appended
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert [r["data"] for r in run.rows] == [*(e.decode() + "\n\n" for e in
                                              EVENTS.split(b"\n\n")[:3]), ""]  # fmt: skip
    assert (run.meta["status"], run.meta["forced_done"], run.meta["dialect"]) == (
        "completed",
        "",
        "generic",
    )
    assert run.meta["silent_end"] == "true"
    assert "error" not in run.meta
    assert forced_total(demo_sidecar) == 0
    assert (
        demo_sidecar.metric(P + "runs_finished_total", dialect="generic", status="completed") == 1
    )
    # A replay ends at the stored end; a reader at the last event is told there is no more.
    async with http.get(f"{demo_sidecar.url}/sidecar/v1/runs/{run_id}/stream") as resp:
        assert await resp.read() == EVENTS
    for cursor in ("3", "4"):
        headers = {"Last-Event-ID": cursor}
        async with http.get(
            f"{demo_sidecar.url}/sidecar/v1/runs/{run_id}/stream", headers=headers
        ) as r:
            assert r.status == 204


@pytest.mark.parametrize(
    ("scenario", "reason"), [("reset", "upstream_error"), ("truncated", "stream_incomplete")]
)
async def test_generic_failure_cuts_the_client_and_appends_nothing(
    demo_sidecar: Sidecar,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
    scenario: str,
    reason: str,
) -> None:
    run_id, body, cut = await generic_run(http, demo_sidecar, scenario)
    # The upstream's failure, shown as the upstream showed it: a broken response, not an end.
    assert isinstance(cut, aiohttp.ClientPayloadError)
    assert body == EVENTS
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert run.rows[-1]["data"] == ""
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", reason)
    error = json.loads(run.meta["error"])
    assert error["type"] == reason
    assert error["message"].startswith(f"sse-sidecar: {reason}: ")
    assert demo_sidecar.metric(P + "forced_done_total", reason=reason, dialect="generic") == 1
    assert forced_total(demo_sidecar) == 1


async def test_generic_done_is_its_own_end(
    demo_sidecar: Sidecar, http: aiohttp.ClientSession, redis_client: redis.asyncio.Redis
) -> None:
    run_id, body, cut = await generic_run(http, demo_sidecar, "done")
    assert cut is None
    assert body == EVENTS + b"id: 4\ndata: [DONE]\n\n"
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert run.rows[-1]["data"] == "id: 4\ndata: [DONE]\n\n"
    assert "silent_end" not in run.meta
    assert (run.meta["status"], run.meta["forced_done"]) == ("completed", "")


async def test_an_eventsource_on_a_cut_generic_run_resumes_once_and_stops(
    demo_sidecar: Sidecar, http: aiohttp.ClientSession, redis_client: redis.asyncio.Redis
) -> None:
    run_id, _, cut = await generic_run(http, demo_sidecar, "reset")
    assert cut is not None
    await stored_run(demo_sidecar, redis_client, run_id)
    source = EventSource(http, f"{demo_sidecar.url}/sidecar/v1/runs/{run_id}/stream")
    async with asyncio.timeout(10):
        await source.run()
    assert [e.data for e in source.events] == ["Server-sent", "events", "carry"]
    assert source.ready_state is ReadyState.CLOSED
    # Connected once, got every event; its reconnection (Last-Event-ID 3) was told "no more".
    assert [(a.status, a.last_event_id) for a in source.attempts] == [(200, None), (204, "3")]


# -- auto without any event, per-route overrides --------------------------------------------


@pytest.mark.parametrize(
    ("path", "dialect", "last"),
    [
        ("/v1/chat/completions", "openai-chat", "[DONE]"),
        ("/v1/messages", "anthropic", "error"),
        ("/v1/whatever", "generic", ""),
    ],
)
async def test_a_run_without_any_event_ends_in_its_path_s_dialect(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    path: str,
    dialect: str,
    last: str,
) -> None:
    demo_sidecar = await make_sidecar()
    upstream.sse(path, [b": just a comment\n\n", RESET])
    async with http.post(demo_sidecar.url + path, json={}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError) if dialect == "generic" else _nothing():
            await resp.read()
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert run.meta["dialect"] == dialect
    assert run.meta["forced_done"] == "upstream_error"
    events = run.events
    if dialect == "generic":
        assert events == []
    else:
        assert (events[-1].data if last == "[DONE]" else events[-1].event) == last
    assert demo_sidecar.metric(P + "runs_started_total", dialect=dialect) == 1
    assert demo_sidecar.metric(P + "runs_finished_total", dialect=dialect) == 1


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def anthropic_steps(gate: Gate | None = None) -> list[Step]:
    start = {"type": "message_start", "message": {"id": "msg_routed", "type": "message"}}
    steps: list[Step] = [data(start, "message_start")]
    if gate is not None:
        steps.append(gate)
    return [*steps, data({"type": "content_block_delta", "delta": {"text": "a"}}, "x")]


async def test_a_route_override_beats_the_global_dialect(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # Letta everywhere, but this custom path speaks Anthropic's events.
    demo_sidecar = await make_sidecar(dialect="letta", dialect_routes="/llm/*/messages=anthropic")
    upstream.sse("/llm/claude/messages", anthropic_steps())
    upstream.sse("/other", [data({"type": "message_start", "message": {"id": "msg_x"}})])
    async with http.post(demo_sidecar.url + "/llm/claude/messages", json={}) as resp:
        routed = ClientView(resp.status, dict(resp.headers), await resp.read())
    async with http.post(demo_sidecar.url + "/other", json={}) as resp:
        letta = ClientView(resp.status, dict(resp.headers), await resp.read())
    assert routed.events[-1].event == "error"
    assert json.loads(routed.events[-1].data or "")["error"]["type"] == "api_error"
    assert letta.events[-1].data == "[DONE]"
    run = await stored_run(demo_sidecar, redis_client, routed.run_id)
    assert (run.meta["dialect"], run.meta["protocol_id"]) == ("anthropic", "msg_routed")
    assert (await stored_run(demo_sidecar, redis_client, letta.run_id)).meta["dialect"] == "letta"
    assert demo_sidecar.metric(P + "runs_started_total", dialect="anthropic") == 1
    assert demo_sidecar.metric(P + "runs_started_total", dialect="letta") == 1


async def test_runs_started_and_finished_pair_per_dialect(
    demo_sidecar: Sidecar, http: aiohttp.ClientSession, redis_client: redis.asyncio.Redis
) -> None:
    routes = {
        "letta": "/v1/agents/a/messages/stream",
        "openai-chat": "/v1/chat/completions",
        "openai-responses": "/v1/responses",
        "anthropic": "/v1/messages",
    }
    for path in routes.values():
        for scenario in ("normal", "dies"):
            async with http.post(
                f"{demo_sidecar.url}{path}?scenario={scenario}&delay_ms=0", json={}
            ) as r:
                await r.read()
    await generic_run(http, demo_sidecar, "normal")
    await generic_run(http, demo_sidecar, "reset")
    await demo_sidecar.flushed()
    for dialect in Dialect:
        assert demo_sidecar.metric(P + "runs_started_total", dialect=dialect.value) == 2, dialect
        assert demo_sidecar.metric(P + "runs_finished_total", dialect=dialect.value) == 2, dialect
        forced = "upstream_error" if dialect is Dialect.GENERIC else "stream_incomplete"
        assert demo_sidecar.metric(P + "forced_done_total", dialect=dialect.value) == 1, dialect
        assert (
            demo_sidecar.metric(P + "forced_done_total", dialect=dialect.value, reason=forced) == 1
        )


# -- the orphan finalizer, in the run's dialect ---------------------------------------------


def responses_steps(gate: Gate) -> list[Step]:
    response = {"id": "resp_orphan", "object": "response", "created_at": 5, "model": "gpt-o"}
    response |= {"status": "in_progress", "output": []}

    def event(n: int, kind: str, **fields: Any) -> bytes:
        return data({"type": kind, "sequence_number": n, **fields}, kind)

    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "logprobs": []}
    return [
        event(0, "response.created", response=response),
        event(1, "response.output_text.delta", delta="a", **where),
        event(2, "response.output_text.delta", delta="b", **where),
        gate,
        event(3, "response.completed", response={**response, "status": "completed"}),
    ]


async def test_a_responses_run_whose_producer_was_killed_ends_with_response_failed(
    replicas: ReplicaFactory,  # noqa: F811 (the fixture imported above)
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    upstream.sse("/v1/responses", responses_steps(gate))
    lease = {"lease_seconds": 0.5}
    a, b = await replicas(a=lease, b={"heartbeat_seconds": 0.1, **lease})
    resp = await http.post(a.url + "/v1/responses", json={})
    await LiveReader(resp).until(3)

    async def stored_on_a() -> bool:
        alias: Any = await redis_client.get("sse:run:alias:{resp_orphan}")
        return alias is not None and await redis_client.xlen(f"sse:run:{{{alias.decode()}}}") == 3

    # The producer dies once its events (and the response id) are in Redis: no event says so.
    await eventually(stored_on_a, what="A to store the run's events")
    a.proc.kill()
    assert await asyncio.wait_for(a.proc.wait(), 5) == -9
    resp.release()
    # A Responses client resumes on B by the response id, with the protocol's own cursor; B
    # notices the dead producer and ends the run as a Responses stream ends.
    async with openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="k", max_retries=0) as client:
        async with asyncio.timeout(10):
            resumed = await client.responses.retrieve("resp_orphan", stream=True, starting_after=0)
            got = [e async for e in resumed]
    assert [(e.type, e.sequence_number) for e in got] == [
        ("response.output_text.delta", 1),
        ("response.output_text.delta", 2),
        ("response.failed", 3),
    ]
    failed = got[-1]
    assert failed.type == "response.failed"
    assert (failed.response.id, failed.response.model, failed.response.created_at) == (
        "resp_orphan",
        "gpt-o",
        5,
    )
    assert failed.response.error is not None
    assert (failed.response.error.code, failed.response.error.type) == (
        "server_error",
        "producer_lost",
    )
    async with http.get(f"{b.url}/sidecar/v1/runs/resp_orphan") as status:
        body = await status.json()
    assert (body["status"], body["forced_done"], body["dialect"], body["last_seq"]) == (
        "failed",
        "producer_lost",
        "openai-responses",
        4,
    )
    assert b.output().count("forced producer_lost") == 1
    gate.open()


# -- cancel, auth by protocol id --------------------------------------------------------------


def chat_steps(gate: Gate) -> list[Step]:
    chunk = {"id": "chatcmpl-cancel", "object": "chat.completion.chunk", "created": 1}
    choice = {"index": 0, "delta": {"content": "a"}, "finish_reason": None}
    return [data({**chunk, "choices": [choice]}), gate, b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("path", "dialect", "protocol_id"),
    [
        ("/v1/chat/completions", "openai-chat", "chatcmpl-cancel"),
        ("/v1/messages", "anthropic", "msg_routed"),
    ],
)
async def test_cancel_by_protocol_id_ends_the_run_in_its_dialect(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    path: str,
    dialect: str,
    protocol_id: str,
) -> None:
    demo_sidecar = await make_sidecar()
    gate = Gate()
    upstream.sse(path, chat_steps(gate) if dialect == "openai-chat" else anthropic_steps(gate))
    async with http.post(demo_sidecar.url + path, json={}) as resp:
        live = LiveReader(resp)
        await live.until(1)
        await gate.reached.wait()
        await eventually(
            lambda: _exists(redis_client, f"sse:run:alias:{{{protocol_id}}}"), what="the alias"
        )
        async with http.post(f"{demo_sidecar.url}/sidecar/v1/runs/{protocol_id}/cancel") as cancel:
            assert cancel.status == 200
            answer = await cancel.json()
        # The answer is the run's stored end, not its state before the terminal landed.
        assert (answer["status"], answer["forced_done"]) == ("cancelled", "cancelled")
        body = await live.rest()
    run = await stored_run(demo_sidecar, redis_client, RunId(answer["run_id"]))
    assert (run.meta["status"], run.meta["forced_done"], run.meta["dialect"]) == (
        "cancelled",
        "cancelled",
        dialect,
    )
    view = ClientView(200, {}, body)
    if dialect == "openai-chat":
        error = json.loads(view.events[-2].data or "")["error"]
        assert (error["type"], view.events[-1].data) == ("cancelled", "[DONE]")
    else:
        error = json.loads(view.events[-1].data or "")["error"]
        assert (view.events[-1].event, error["type"]) == ("error", "api_error")
    assert error["message"].startswith("sse-sidecar: cancelled: ")
    gate.open()


async def _exists(client: redis.asyncio.Redis, key: str) -> bool:
    return bool(await client.exists(key))


async def test_a_per_run_token_reads_its_run_by_protocol_id_and_only_its_own(
    make_sidecar: SidecarFactory,
    demo_upstream: str,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    demo_sidecar = await make_sidecar(upstream_url=demo_upstream, signing_key="k")
    tokens = {}
    for demo_id in ("one", "two"):
        url = f"{demo_sidecar.url}/v1/chat/completions?delay_ms=0"
        async with http.post(url, json={}, headers={"X-Demo-Id": demo_id}) as resp:
            await resp.read()
            tokens[demo_id] = resp.headers["X-Sidecar-Replay-Token"]
    await demo_sidecar.flushed()
    await eventually(lambda: _exists(redis_client, "sse:run:alias:{chatcmpl-two}"), what="alias")
    status_url = f"{demo_sidecar.url}/sidecar/v1/runs/chatcmpl-one"
    for headers, code in (
        ({"Authorization": f"Bearer {tokens['one']}"}, 200),
        ({"Authorization": f"Bearer {tokens['two']}"}, 403),
        ({}, 401),
    ):
        async with http.get(status_url, headers=headers) as resp:
            assert resp.status == code, headers
    # The Responses resume route checks the same tokens (the openai SDK sends its api_key).
    async with http.post(f"{demo_sidecar.url}/v1/responses?delay_ms=0", json={},
                         headers={"X-Demo-Id": "three"}) as resp:  # fmt: skip
        await resp.read()
        token = resp.headers["X-Sidecar-Replay-Token"]
    await demo_sidecar.flushed()
    await eventually(lambda: _exists(redis_client, "sse:run:alias:{resp_three}"), what="alias")
    async with openai.AsyncOpenAI(
        base_url=demo_sidecar.url + "/v1", api_key=token, max_retries=0
    ) as ok:
        events = [e async for e in await ok.responses.retrieve("resp_three", stream=True)]
        assert events[-1].type == "response.completed"
    async with openai.AsyncOpenAI(
        base_url=demo_sidecar.url + "/v1", api_key="nope", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.responses.retrieve("resp_three", stream=True)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_an_eventsource_whose_connection_drops_gets_every_event_once(
    demo_sidecar: Sidecar, http: aiohttp.ClientSession, redis_client: redis.asyncio.Redis, path: str
) -> None:
    """Any dialect's run: the replay route resumes with Last-Event-ID, every event once, then
    204 stops the EventSource after the run's own terminal."""
    async with http.post(f"{demo_sidecar.url}{path}?delay_ms=0&tokens=6", json={}) as resp:
        live = ClientView(resp.status, dict(resp.headers), await resp.read())
    await stored_run(demo_sidecar, redis_client, live.run_id)
    source = EventSource(
        http, f"{demo_sidecar.url}/sidecar/v1/runs/{live.run_id}/stream", drop_after={2, 5, 6}
    )
    async with asyncio.timeout(10):
        await source.run()
    assert [(e.type, e.data) for e in source.events] == [
        (e.event or "message", e.data) for e in live.events
    ]
    assert source.attempts[-1].status == 204
    assert source.ready_state is ReadyState.CLOSED
