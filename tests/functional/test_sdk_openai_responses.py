"""The official ``openai`` SDK's Responses streams through a real sidecar (``auto`` dialect)
against the demo upstream, compared with the same request straight to the upstream; and the
Responses resume, ``responses.retrieve(id, stream=True, starting_after=N)``, served from Redis.

DESIGN.md "Dialects": ``response.completed`` / ``.incomplete`` / ``.failed`` / ``error`` end a
Responses stream (it has no ``[DONE]``); when none comes the sidecar appends ``response.failed``
for the stream's response, continuing its ``sequence_number``s, so the SDK's stream helper raises
as it does for the upstream's own ``response.failed``. Before the dialects every healthy stream
got two junk events after ``response.completed`` and was stored failed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio
from openai.types.responses import Response, ResponseStreamEvent

from sidecar.keys import RunId
from tests.conftest import Gate, Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import (
    LiveReader,
    data,
    eventually,
    forced_total,
    read_until_bytes,
    stored_run,
)

REQUEST: dict[str, Any] = {"model": "demo-llm-1", "input": "Tell me about server-sent events."}


@pytest.fixture
async def via_sidecar(demo_sidecar: Sidecar) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=demo_sidecar.url + "/v1", api_key="k", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def direct(demo_upstream: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=demo_upstream + "/v1", api_key="k", max_retries=0) as c:
        yield c


def ids() -> tuple[RunId, str]:
    tag = uuid.uuid4().hex[:12]
    return RunId(f"run-{tag}"), tag


def options(scenario: str, run_id: RunId, demo_id: str, tokens: int = 5) -> dict[str, Any]:
    return {
        "extra_body": {"scenario": scenario, "tokens": tokens, "delay_ms": 0},
        "extra_headers": {"X-Run-Id": run_id, "X-Demo-Id": demo_id},
    }


async def raw_events(
    client: openai.AsyncOpenAI, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[ResponseStreamEvent], BaseException | None]:
    """``responses.create(stream=True)``: the events, and what the SDK raised."""
    got: list[ResponseStreamEvent] = []
    try:
        stream = await client.responses.create(
            **REQUEST, stream=True, **options(scenario, run_id, demo_id)
        )
        async for event in stream:
            got.append(event)
    except openai.OpenAIError as exc:
        return got, exc
    return got, None


async def final_response(
    client: openai.AsyncOpenAI, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[str], Response | BaseException]:
    """``responses.stream()`` (the helper): the event types, and the final response (or what
    ``get_final_response`` raised)."""
    kinds: list[str] = []
    try:
        async with client.responses.stream(**REQUEST, **options(scenario, run_id, demo_id)) as s:
            async for event in s:
                kinds.append(event.type)
            return kinds, await s.get_final_response()
    except Exception as exc:  # the helper raises RuntimeError for a stream that did not complete
        return kinds, exc


def dumps(events: list[ResponseStreamEvent]) -> list[dict[str, Any]]:
    return [e.model_dump() for e in events]


async def test_a_healthy_response_is_the_same_completed_and_not_forced(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want_kinds, want = await final_response(direct, "normal", RunId("unused"), demo_id)
    got_kinds, got = await final_response(via_sidecar, "normal", run_id, demo_id)
    assert isinstance(want, Response)
    assert isinstance(got, Response)
    assert got.model_dump() == want.model_dump()
    assert got.output_text == "Server-sent events carry an answer "
    assert got_kinds == want_kinds
    assert got_kinds[-1] == "response.completed"

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "completed",
        "",
    )
    assert (run.meta["dialect"], run.meta["protocol_id"]) == ("openai-responses", got.id)
    assert [e.event for e in run.events].count("response.completed") == 1
    assert run.events[-1].event == "response.completed"  # nothing after it
    assert forced_total(demo_sidecar) == 0

    run_id, demo_id = ids()
    want_events, _ = await raw_events(direct, "normal", RunId("unused"), demo_id)
    got_events, exc = await raw_events(via_sidecar, "normal", run_id, demo_id)
    assert exc is None
    assert dumps(got_events) == dumps(want_events)
    assert forced_total(demo_sidecar) == 0


async def test_an_upstream_failed_response_is_the_same_stored_and_not_forced(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want_kinds, want = await final_response(direct, "error_then_done", RunId("unused"), demo_id)
    got_kinds, got = await final_response(via_sidecar, "error_then_done", run_id, demo_id)
    assert type(got) is type(want) is RuntimeError
    assert str(got) == str(want)
    assert got_kinds == want_kinds
    assert got_kinds[-1] == "response.failed"

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "failed",
        "failed",
        "",
    )
    assert json.loads(run.meta["error"]) == {
        "code": "server_error",
        "message": "The model provider failed mid-response",
    }
    assert forced_total(demo_sidecar) == 0


@pytest.mark.parametrize(
    ("scenario", "reason"), [("dies", "stream_incomplete"), ("reset", "upstream_error")]
)
async def test_a_response_that_dies_ends_with_response_failed_naming_the_reason(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
    scenario: str,
    reason: str,
) -> None:
    run_id, demo_id = ids()
    got_kinds, got = await final_response(via_sidecar, scenario, run_id, demo_id)
    # The helper's own error for a response that did not complete, as for an upstream failure.
    assert type(got) is RuntimeError
    assert str(got) == "Didn't receive a `response.completed` event."
    assert got_kinds[-1] == "response.failed"

    run_id, demo_id = ids()
    want_events, _ = await raw_events(direct, "dies", RunId("unused"), demo_id)
    events, exc = await raw_events(via_sidecar, scenario, run_id, demo_id)
    assert exc is None
    assert dumps(events[:-1]) == dumps(want_events)
    failed = events[-1]
    assert failed.type == "response.failed"
    # It continues the stream's sequence numbers, for the response the stream named.
    assert failed.sequence_number == want_events[-1].sequence_number + 1
    assert failed.response.id == f"resp_{demo_id}"
    assert failed.response.status == "failed"
    assert failed.response.model == "demo-llm-1"
    assert failed.response.error is not None
    assert failed.response.error.code == "server_error"
    assert failed.response.error.type == reason
    assert failed.response.error.message.startswith(f"sse-sidecar: {reason}: ")

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "failed",
        "failed",
        reason,
    )
    assert json.loads(run.meta["error"]) == failed.response.error.model_dump(exclude_none=True)
    assert run.events[-1].event == "response.failed"
    assert [e.event for e in run.events].count("response.failed") == 1
    assert (
        demo_sidecar.metric(
            "sse_sidecar_forced_done_total", reason=reason, dialect="openai-responses"
        )
        == 2
    )


async def test_resume_with_starting_after_is_served_from_redis_exactly_once(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    events, _ = await raw_events(via_sidecar, "normal", run_id, demo_id)
    await stored_run(demo_sidecar, redis_client, run_id)
    response_id = f"resp_{demo_id}"
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    for after in (0, 3, len(events) - 2):
        resumed = await via_sidecar.responses.retrieve(
            response_id, stream=True, starting_after=after
        )
        got = [e async for e in resumed]
        assert dumps(got) == dumps(events[after + 1 :])
        # The upstream answers the same resume the same way (it keeps its streams too).
        upstream = await direct.responses.retrieve(response_id, stream=True, starting_after=after)
        assert dumps([e async for e in upstream]) == dumps(got)
    # Served by the sidecar from Redis, not proxied.
    P = "sse_sidecar_"
    assert demo_sidecar.metric(P + "http_requests_total", route="responses_resume", code="200") == 3
    assert demo_sidecar.metric(P + "replay_requests_total", outcome="ok") == 3

    # The stream helper resumes the same way, and completes.
    async with via_sidecar.responses.stream(response_id=response_id, starting_after=4) as s:
        kinds = [e.type async for e in s]
        final = await s.get_final_response()
    assert kinds == [e.type for e in events[5:]]
    assert final.output_text == "Server-sent events carry an answer "


async def test_resume_of_a_live_response_follows_it_to_its_end(
    demo_sidecar: Sidecar, via_sidecar: openai.AsyncOpenAI, redis_client: redis.asyncio.Redis
) -> None:
    run_id, demo_id = ids()
    opts = options("normal", run_id, demo_id, tokens=40)
    opts["extra_body"]["delay_ms"] = 5
    stream = await via_sidecar.responses.create(**REQUEST, stream=True, **opts)
    first: list[ResponseStreamEvent] = []
    async for event in stream:
        first.append(event)
        if len(first) == 8:
            break
    resumed = await via_sidecar.responses.retrieve(
        f"resp_{demo_id}", stream=True, starting_after=first[-1].sequence_number
    )
    rest = [e async for e in resumed]
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))  # every event exactly once
    assert rest[-1].type == "response.completed"
    await stream.close()


async def test_resume_of_a_response_the_sidecar_never_saw_is_proxied(
    demo_sidecar: Sidecar, via_sidecar: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    _, demo_id = ids()
    events, _ = await raw_events(direct, "normal", RunId("unused"), demo_id)
    resumed = await via_sidecar.responses.retrieve(f"resp_{demo_id}", stream=True, starting_after=5)
    assert dumps([e async for e in resumed]) == dumps(events[6:])
    assert demo_sidecar.metric("sse_sidecar_replay_requests_total") == 0
    # And an id nobody knows is the upstream's 404.
    with pytest.raises(openai.NotFoundError):
        await via_sidecar.responses.retrieve("resp_nobody", stream=True)


async def test_a_held_resume_gets_heartbeats_the_sdk_skips(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """While the upstream is silent, the replay sends ``: ping`` comments; after the ``id:``
    lines, a comment with a blank line would be an empty event the SDK cannot parse."""
    demo_sidecar = await make_sidecar(heartbeat_seconds=0.05)
    created = {"id": "resp_held", "object": "response", "created_at": 1, "status": "in_progress"}
    created |= {"model": "m", "output": []}

    def event(n: int, kind: str, **fields: Any) -> bytes:
        return data({"type": kind, "sequence_number": n, **fields}, kind)

    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "logprobs": []}
    gate = Gate()
    upstream.sse(
        "/v1/responses",
        [
            event(0, "response.created", response=created),
            event(1, "response.output_text.delta", delta="a", **where),
            gate,
            event(2, "response.output_text.delta", delta="b", **where),
            event(3, "response.completed", response={**created, "status": "completed"}),
        ],
    )
    async with (
        openai.AsyncOpenAI(base_url=demo_sidecar.url + "/v1", api_key="k", max_retries=0) as client,
        http.post(demo_sidecar.url + "/v1/responses", json={}) as live,
    ):
        reader = LiveReader(live)
        await reader.until(2)
        await gate.reached.wait()
        await eventually(lambda: has_alias(redis_client, "resp_held"), what="the alias")
        resumed = await client.responses.retrieve("resp_held", stream=True, starting_after=0)
        got = [await anext(resumed)]
        # A second reader that started later has seen two heartbeats: the SDK's has had its own.
        url = f"{demo_sidecar.url}/v1/responses/resp_held?stream=true&starting_after=1"
        async with http.get(url) as raw:
            await read_until_bytes(LiveReader(raw), b": ping\n", count=2)
        gate.open()
        got += [e async for e in resumed]
        await reader.rest()
    assert [(e.type, e.sequence_number) for e in got] == [
        ("response.output_text.delta", 1),
        ("response.output_text.delta", 2),
        ("response.completed", 3),
    ]


async def has_alias(client: redis.asyncio.Redis, protocol_id: str) -> bool:
    return bool(await client.exists(f"sse:run:alias:{{{protocol_id}}}"))
