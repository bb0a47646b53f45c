"""The official ``openai`` SDK's Chat Completions stream through a real sidecar (``auto`` dialect)
against the demo upstream, compared with the same request straight to the upstream.

DESIGN.md "Dialects": a natural end is never forced; an upstream error is stored and not forced;
when ``[DONE]`` never comes the sidecar appends an OpenAI error chunk and ``[DONE]``, so the SDK
raises ``APIError`` (its own error type for a failed stream) instead of ending silently.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
import redis.asyncio
from openai.types.chat import ChatCompletionChunk

from sidecar.keys import RunId
from tests.conftest import Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import DONE, data, forced_total, stored_run

REQUEST: dict[str, Any] = {
    "model": "demo-llm-1",
    "messages": [{"role": "user", "content": "Tell me about server-sent events."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


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


def compact(value: Any) -> str:
    return orjson.dumps(value).decode()


def ids() -> tuple[RunId, str]:
    """A run id for the sidecar, and a demo id: the upstream's ids and timestamps derive from
    it, so the same request gets the same chunks straight or through the sidecar."""
    tag = uuid.uuid4().hex[:12]
    return RunId(f"run-{tag}"), tag


async def chunks(
    client: openai.AsyncOpenAI, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[ChatCompletionChunk], BaseException | None]:
    """The chunks the SDK yielded, and what it raised (None when it ended normally)."""
    got: list[ChatCompletionChunk] = []
    try:
        stream = await client.chat.completions.create(
            **REQUEST,
            extra_body={"scenario": scenario, "tokens": 5, "delay_ms": 0},
            extra_headers={"X-Run-Id": run_id, "X-Demo-Id": demo_id},
        )
        async for chunk in stream:
            got.append(chunk)
    except openai.OpenAIError as exc:
        return got, exc
    return got, None


async def test_a_healthy_stream_is_the_same_and_completed_and_nothing_is_forced(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want, raised = await chunks(direct, "normal", RunId("unused"), demo_id)
    assert raised is None
    got, raised = await chunks(via_sidecar, "normal", run_id, demo_id)
    assert raised is None
    assert [c.model_dump() for c in got] == [c.model_dump() for c in want]
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == (
        "Server-sent events carry an answer "
    )
    assert got[-1].usage is not None

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "stop",
        "",
    )
    assert run.meta["dialect"] == "openai-chat"
    assert run.meta["protocol_id"] == f"chatcmpl-{demo_id}"
    assert "error" not in run.meta
    assert [e.data for e in run.events].count("[DONE]") == 1
    assert run.events[-1].data == "[DONE]"
    assert forced_total(demo_sidecar) == 0
    P = "sse_sidecar_"
    assert demo_sidecar.metric(P + "runs_started_total", dialect="openai-chat") == 1
    assert demo_sidecar.metric(P + "runs_finished_total", dialect="openai-chat", status="completed",
                     stop_reason="stop") == 1  # fmt: skip


async def test_an_upstream_error_raises_the_same_error_is_stored_and_is_not_forced(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want, want_exc = await chunks(direct, "error_then_done", RunId("unused"), demo_id)
    got, got_exc = await chunks(via_sidecar, "error_then_done", run_id, demo_id)
    assert type(got_exc) is type(want_exc) is openai.APIError
    assert isinstance(got_exc, openai.APIError)
    assert isinstance(want_exc, openai.APIError)
    assert (got_exc.message, got_exc.body) == (want_exc.message, want_exc.body)
    assert [c.model_dump() for c in got] == [c.model_dump() for c in want]

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", "")
    assert run.meta["stop_reason"] == ""
    error = {"message": "The model is overloaded", "type": "server_error", "param": None}
    assert json.loads(run.meta["error"]) == {**error, "code": "overloaded"}
    assert run.events[-1].data == "[DONE]"
    assert forced_total(demo_sidecar) == 0
    assert (
        demo_sidecar.metric(
            "sse_sidecar_stream_transitions_total", transition="saw_done_after_error"
        )
        == 1
    )


@pytest.mark.parametrize(
    ("scenario", "reason"), [("dies", "stream_incomplete"), ("reset", "upstream_error")]
)
async def test_a_stream_that_dies_raises_api_error_with_the_forced_reason(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    direct: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
    scenario: str,
    reason: str,
) -> None:
    run_id, demo_id = ids()
    want, _ = await chunks(direct, scenario, RunId("unused"), demo_id)
    got, exc = await chunks(via_sidecar, scenario, run_id, demo_id)
    # Straight from the upstream the SDK ends silently ("dies") or loses the connection
    # ("reset"); through the sidecar it raises the error a failed Chat Completions stream carries.
    assert isinstance(exc, openai.APIError)
    assert not isinstance(exc, openai.APIConnectionError)
    assert exc.body == {
        "message": exc.message,
        "type": reason,
        "param": None,
        "code": None,
    }
    assert exc.message.startswith(f"sse-sidecar: {reason}: ")
    assert [c.model_dump() for c in got] == [c.model_dump() for c in want]

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", reason)
    assert json.loads(run.meta["error"]) == exc.body
    # One terminal, last: the error chunk, then the only [DONE].
    assert [e.data for e in run.events[-2:]] == [
        '{"error":' + compact(exc.body) + "}",
        "[DONE]",
    ]
    assert [e.data for e in run.events].count("[DONE]") == 1
    assert (
        demo_sidecar.metric("sse_sidecar_forced_done_total", reason=reason, dialect="openai-chat")
        == 1
    )
    assert forced_total(demo_sidecar) == 1


async def test_a_finish_reason_without_done_gets_only_its_done(
    demo_sidecar: Sidecar,
    via_sidecar: openai.AsyncOpenAI,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    got, exc = await chunks(via_sidecar, "stop_no_done", run_id, demo_id)
    assert exc is None
    assert got[-1].usage is not None
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "stop",
        "missing_done",
    )
    assert run.events[-1].data == "[DONE]"
    assert "error" not in run.meta


async def test_the_run_is_found_by_its_chatcmpl_id(
    demo_sidecar: Sidecar, via_sidecar: openai.AsyncOpenAI, redis_client: redis.asyncio.Redis
) -> None:
    run_id, demo_id = ids()
    await chunks(via_sidecar, "normal", run_id, demo_id)
    await stored_run(demo_sidecar, redis_client, run_id)
    by_protocol = await via_sidecar.get(
        f"{demo_sidecar.url}/sidecar/v1/runs/chatcmpl-{demo_id}", cast_to=object
    )
    assert isinstance(by_protocol, dict)
    assert by_protocol["run_id"] == run_id
    assert by_protocol["dialect"] == "openai-chat"
    assert by_protocol["protocol_id"] == f"chatcmpl-{demo_id}"


async def test_keepalive_comments_do_not_break_the_sdk(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Servers send ``: keep-alive`` comments between chunks. The sidecar adds ``id:`` lines,
    and the SDK's decoder keeps the last id across events: a comment followed by a blank line
    would then dispatch an event with empty data, which the SDK cannot parse as JSON."""
    demo_sidecar = await make_sidecar()
    chunk = {"id": "chatcmpl-k", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def delta(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return data({**chunk, "choices": [choice]})

    upstream.sse(
        "/v1/chat/completions",
        [delta("a"), b": keep-alive\n\n", delta("b"), b": keep-alive\n\n", delta("", "stop"), DONE],
    )
    async with openai.AsyncOpenAI(
        base_url=demo_sidecar.url + "/v1", api_key="k", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**REQUEST)
        got = [c.choices[0].delta.content async for c in stream]
    assert got == ["a", "b", ""]
