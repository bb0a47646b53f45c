"""The official ``anthropic`` SDK through a real sidecar (``auto`` dialect) against the demo
upstream, compared with the same request straight to the upstream.

DESIGN.md "Dialects": ``message_stop`` ends a message and an ``event: error`` ends a failed one,
both natural ends; when neither comes the sidecar appends an Anthropic ``event: error``
(``api_error``), so the SDK raises ``APIStatusError`` as it does for the upstream's own errors.
Before the dialects, every healthy stream made this SDK raise after ``message_stop``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
import redis.asyncio
from anthropic.types import Message, RawMessageStreamEvent

from sidecar.keys import RunId
from tests.conftest import Sidecar
from tests.functional.helpers import forced_total, stored_run

REQUEST: dict[str, Any] = {
    "model": "demo-llm-1",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Tell me about server-sent events."}],
}


@pytest.fixture
async def via_sidecar(demo_sidecar: Sidecar) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=demo_sidecar.url, api_key="k", max_retries=0) as c:
        yield c


@pytest.fixture
async def direct(demo_upstream: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=demo_upstream, api_key="k", max_retries=0) as c:
        yield c


def ids() -> tuple[RunId, str]:
    tag = uuid.uuid4().hex[:12]
    return RunId(f"run-{tag}"), tag


def options(scenario: str, run_id: RunId, demo_id: str) -> dict[str, Any]:
    return {
        "extra_body": {"scenario": scenario, "tokens": 5, "delay_ms": 0},
        "extra_headers": {"X-Run-Id": run_id, "X-Demo-Id": demo_id},
    }


async def raw_events(
    client: anthropic.AsyncAnthropic, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[RawMessageStreamEvent], BaseException | None]:
    """``messages.create(stream=True)``: the events, and what the SDK raised."""
    got: list[RawMessageStreamEvent] = []
    try:
        stream = await client.messages.create(
            **REQUEST, stream=True, **options(scenario, run_id, demo_id)
        )
        async for event in stream:
            got.append(event)
    except anthropic.AnthropicError as exc:
        return got, exc
    return got, None


async def final_message(
    client: anthropic.AsyncAnthropic, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[str], Message | BaseException]:
    """``messages.stream()``: the text deltas, and the final message (or what was raised)."""
    text: list[str] = []
    try:
        async with client.messages.stream(**REQUEST, **options(scenario, run_id, demo_id)) as s:
            async for delta in s.text_stream:
                text.append(delta)
            return text, await s.get_final_message()
    except Exception as exc:  # straight from a reset upstream, httpx's own error escapes
        return text, exc


async def test_a_healthy_message_is_the_same_completed_and_not_forced(
    demo_sidecar: Sidecar,
    via_sidecar: anthropic.AsyncAnthropic,
    direct: anthropic.AsyncAnthropic,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want_text, want = await final_message(direct, "normal", RunId("unused"), demo_id)
    got_text, got = await final_message(via_sidecar, "normal", run_id, demo_id)
    assert isinstance(want, Message)
    assert isinstance(got, Message)  # get_final_message() returns: nothing after message_stop
    assert got.model_dump() == want.model_dump()
    assert got_text == want_text == ["Server-sent ", "events ", "carry ", "an ", "answer "]
    assert (got.id, got.stop_reason) == (f"msg_{demo_id}", "end_turn")

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "end_turn",
        "",
    )
    assert (run.meta["dialect"], run.meta["protocol_id"]) == ("anthropic", f"msg_{demo_id}")
    assert [e.event for e in run.events][-1] == "message_stop"
    assert [e.event for e in run.events].count("message_stop") == 1
    assert forced_total(demo_sidecar) == 0

    # The raw stream too: every event the same, in order.
    run_id, demo_id = ids()
    want_events, want_exc = await raw_events(direct, "normal", RunId("unused"), demo_id)
    got_events, got_exc = await raw_events(via_sidecar, "normal", run_id, demo_id)
    assert want_exc is None
    assert got_exc is None
    assert [e.model_dump() for e in got_events] == [e.model_dump() for e in want_events]
    assert forced_total(demo_sidecar) == 0
    assert demo_sidecar.metric("sse_sidecar_runs_finished_total", dialect="anthropic") == 2


async def test_an_upstream_error_event_raises_the_same_error_and_ends_the_message(
    demo_sidecar: Sidecar,
    via_sidecar: anthropic.AsyncAnthropic,
    direct: anthropic.AsyncAnthropic,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want_events, want_exc = await raw_events(direct, "error_then_done", RunId("unused"), demo_id)
    got_events, got_exc = await raw_events(via_sidecar, "error_then_done", run_id, demo_id)
    assert type(got_exc) is type(want_exc) is anthropic.APIStatusError
    assert isinstance(got_exc, anthropic.APIStatusError)
    assert isinstance(want_exc, anthropic.APIStatusError)
    assert got_exc.body == want_exc.body
    assert [e.model_dump() for e in got_events] == [e.model_dump() for e in want_events]

    run = await stored_run(demo_sidecar, redis_client, run_id)
    # The error event is the upstream's own terminal for a failed message: natural, not forced.
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", "")
    assert json.loads(run.meta["error"]) == {"type": "overloaded_error", "message": "Overloaded"}
    assert run.events[-1].event == "error"
    assert forced_total(demo_sidecar) == 0
    P = "sse_sidecar_stream_transitions_total"
    assert (
        demo_sidecar.metric(P, transition="saw_error")
        == demo_sidecar.metric(P, transition="saw_done")
        == 1
    )


@pytest.mark.parametrize(
    ("scenario", "reason"), [("dies", "stream_incomplete"), ("reset", "upstream_error")]
)
async def test_a_message_that_dies_raises_api_status_error_with_the_forced_reason(
    demo_sidecar: Sidecar,
    via_sidecar: anthropic.AsyncAnthropic,
    direct: anthropic.AsyncAnthropic,
    redis_client: redis.asyncio.Redis,
    scenario: str,
    reason: str,
) -> None:
    run_id, demo_id = ids()
    want_text, _ = await final_message(direct, scenario, RunId("unused"), demo_id)
    got_text, got = await final_message(via_sidecar, scenario, run_id, demo_id)
    assert got_text == want_text
    # Straight from the upstream, "dies" returns a message that never stopped (stop_reason None);
    # through the sidecar the SDK raises, as for any failed message.
    assert type(got) is anthropic.APIStatusError
    assert isinstance(got.body, dict)
    assert got.body["type"] == "error"
    assert got.body["error"]["type"] == "api_error"
    assert got.body["error"]["message"].startswith(f"sse-sidecar: {reason}: ")

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", reason)
    assert json.loads(run.meta["error"]) == got.body["error"]
    # One terminal, last: the appended error event; no message_stop, nothing after it.
    assert run.events[-1].event == "error"
    assert json.loads(run.events[-1].data or "") == got.body
    assert [e.event for e in run.events].count("error") == 1
    assert "message_stop" not in [e.event for e in run.events]
    assert (
        demo_sidecar.metric("sse_sidecar_forced_done_total", reason=reason, dialect="anthropic")
        == 1
    )
    assert forced_total(demo_sidecar) == 1


async def test_a_stop_reason_without_message_stop_gets_only_its_message_stop(
    demo_sidecar: Sidecar, via_sidecar: anthropic.AsyncAnthropic, redis_client: redis.asyncio.Redis
) -> None:
    run_id, demo_id = ids()
    _, got = await final_message(via_sidecar, "stop_no_done", run_id, demo_id)
    assert isinstance(got, Message)
    assert got.stop_reason == "end_turn"
    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "end_turn",
        "missing_done",
    )
    assert (run.events[-1].event, run.events[-1].data) == (
        "message_stop",
        '{"type":"message_stop"}',
    )
    assert "error" not in run.meta
