"""The official Letta SDK (``letta_client``) resumes runs through the sidecar.

``client.runs.messages.stream(run_id, starting_after=N)`` POSTs ``{"starting_after": N}`` to
``/v1/runs/{run_id}/stream``, decodes the SSE response, turns each plain ``data:`` event into a
typed message, raises on ``event: error`` and stops at ``data: [DONE]``. DESIGN.md "The API"
promises that this call, pointed at the sidecar, gets the run's events after N from history and
then live. The upstream here streams what a Letta server streams (reasoning and assistant messages
with ``id``/``date``/``otid``/``step_id``, then ``stop_reason``, ``usage_statistics``, ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from letta_client import (
    APIStatusError,
    AsyncLetta,
    AuthenticationError,
    Letta,
    NotFoundError,
)
from letta_client.types.agents import AssistantMessage, ReasoningMessage
from letta_client.types.agents.letta_streaming_response import (
    LettaPing,
    LettaStopReason,
    LettaStreamingResponse,
    LettaUsageStatistics,
)

from sidecar.keys import RunId
from tests.conftest import RESET, Gate, Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, ClientView, LiveReader, data, eventually

PATH = "/v1/agents/agent-5f1b2c/messages/stream"
STEP_ID = "step-0c6b7a4e-2a8d-4a53-9d0e-6f3f6b1c2a11"


def letta_message(n: int, kind: str, text: str) -> dict[str, Any]:
    """One message as a Letta server streams it (ids null: the sidecar fills seq_id/run_id)."""
    out: dict[str, Any] = {
        "id": f"message-8e2f4d8a-4a4b-4b55-8f7c-1d2e3f4a5b{n:02d}",
        "date": f"2025-06-01T12:00:{n:02d}+00:00",
        "name": None,
        "message_type": kind,
        "otid": f"8e2f4d8a-4a4b-4b55-8f7c-1d2e3f4a5b{n:02d}-{n}",
        "sender_id": None,
        "step_id": STEP_ID,
        "is_err": None,
        "seq_id": None,
        "run_id": None,
    }
    if kind == "reasoning_message":
        out |= {"source": "reasoner_model", "reasoning": text, "signature": None}
    else:
        out["content"] = text
    return out


MESSAGES = [
    letta_message(1, "reasoning_message", "The user greets me. I should answer kindly."),
    letta_message(2, "assistant_message", "Hello"),
    letta_message(3, "assistant_message", "! Résumé: ünïcødé ✓, "),
    letta_message(4, "assistant_message", 'a literal "data: [DONE]\\n\\n" inside text, '),
    letta_message(5, "reasoning_message", "Offer help."),
    letta_message(6, "assistant_message", "how can I help you today?"),
]
STOP = {"message_type": "stop_reason", "stop_reason": "end_turn"}
USAGE = {
    "message_type": "usage_statistics",
    "completion_tokens": 42,
    "prompt_tokens": 1337,
    "total_tokens": 1379,
    "step_count": 1,
    "run_ids": None,
    "cached_input_tokens": None,
    "cache_write_tokens": None,
    "reasoning_tokens": 11,
}
# Events before the gate in the live tests.
HELD = 4


def steps(gate: Gate | None = None) -> list[Step]:
    out: list[Step] = [data(m) for m in MESSAGES[:HELD]]
    if gate is not None:
        out.append(gate)
    out += [data(m) for m in MESSAGES[HELD:]]
    return [*out, data(STOP), data(USAGE), DONE]


def expected_items(view: ClientView, after: int) -> list[dict[str, Any]]:
    """What the SDK should yield after seq ``after``: every JSON event of the live stream, as
    the live client received it (ids filled), up to but not including ``[DONE]``."""
    out = []
    for event in view.events:
        assert event.id is not None
        if int(event.id) <= after or event.data == "[DONE]":
            continue
        assert event.event is None
        payload = json.loads(event.data or "")
        if "date" in payload:
            payload["date"] = datetime.fromisoformat(payload["date"])
        out.append(payload)
    return out


def as_dicts(items: list[LettaStreamingResponse]) -> list[dict[str, object]]:
    return [item.to_dict() for item in items]


KINDS = {
    "reasoning_message": ReasoningMessage,
    "assistant_message": AssistantMessage,
    "stop_reason": LettaStopReason,
    "usage_statistics": LettaUsageStatistics,
}


def check_items(items: list[LettaStreamingResponse], view: ClientView, after: int) -> None:
    expected = expected_items(view, after)
    assert as_dicts(items) == expected
    # The same, spelled out: the type the SDK chose, and the cursor it would resume from.
    assert [type(i) for i in items] == [KINDS[e["message_type"]] for e in expected]
    assert [i.to_dict()["seq_id"] for i in items] == list(range(after + 1, len(view.events)))
    assert {i.to_dict()["run_id"] for i in items} <= {view.run_id}


async def tee(http: aiohttp.ClientSession, sc: Sidecar, upstream: Upstream) -> ClientView:
    """A whole run through the sidecar, as its live client saw it."""
    upstream.sse(PATH, steps())
    async with http.post(sc.url + PATH, json={"messages": []}) as resp:
        assert resp.status == 200
        view = ClientView(resp.status, dict(resp.headers), await resp.read())
    assert len(view.events) == len(MESSAGES) + 3
    await sc.flushed()
    return view


@pytest.fixture
async def letta(sidecar: Sidecar) -> AsyncIterator[AsyncLetta]:
    async with AsyncLetta(base_url=sidecar.url, api_key="x", max_retries=0) as client:
        yield client


async def sdk_stream(
    client: AsyncLetta, run_id: str, starting_after: int, **kwargs: Any
) -> list[LettaStreamingResponse]:
    async with asyncio.timeout(10):
        stream = await client.runs.messages.stream(run_id, starting_after=starting_after, **kwargs)
        return [item async for item in stream]


async def test_the_sdk_resumes_a_finished_run_from_any_seq(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    letta: AsyncLetta,
) -> None:
    view = await tee(http, sidecar, upstream)
    last = len(view.events)
    for after in (0, 1, 3, HELD, last - 2, last - 1):
        items = await sdk_stream(letta, view.run_id, after)
        check_items(items, view, after)
    # The request the SDK made is the Letta form of the replay route.
    assert sidecar.metric("sse_sidecar_http_requests_total", route="letta_replay", method="POST",
                          code="200") == 6  # fmt: skip


async def test_the_sync_sdk_in_a_thread_resumes_too(
    sidecar: Sidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    view = await tee(http, sidecar, upstream)

    def resume() -> list[LettaStreamingResponse]:
        with Letta(base_url=sidecar.url, api_key="x", max_retries=0, timeout=10) as client:
            return list(client.runs.messages.stream(view.run_id, starting_after=2))

    items = await asyncio.to_thread(resume)
    check_items(items, view, 2)


async def test_the_sdk_follows_a_live_run_to_its_done(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    letta: AsyncLetta,
) -> None:
    gate = Gate()
    upstream.sse(PATH, steps(gate))
    async with http.post(sidecar.url + PATH, json={"messages": []}) as resp:
        live = LiveReader(resp)
        await live.until(HELD)
        await gate.reached.wait()
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        async with asyncio.timeout(10):
            stream = await letta.runs.messages.stream(run_id, starting_after=1)
            # History first: what the run has produced so far, while the upstream is held.
            got = [await anext(stream) for _ in range(HELD - 1)]
            assert not gate.event.is_set()
            gate.open()
            # Then live: the rest as the upstream produces it, and the iteration ends at [DONE].
            got += [item async for item in stream]
        body = await live.rest()
    view = ClientView(200, dict(resp.headers), body)
    check_items(got, view, 1)
    assert len(got) == len(view.events) - 2

    async def reader_gone() -> bool:
        return sidecar.metric("sse_sidecar_replay_active") == 0

    await eventually(reader_gone, what="the replay reader to end")


async def test_resuming_after_the_last_seq_of_a_finished_run_yields_nothing(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    letta: AsyncLetta,
) -> None:
    view = await tee(http, sidecar, upstream)
    last = len(view.events)
    url = f"{sidecar.url}/v1/runs/{view.run_id}/stream"
    async with http.post(url, json={"starting_after": last}) as resp:
        assert resp.status == 204
    assert await sdk_stream(letta, view.run_id, last) == []


async def test_a_run_that_failed_raises_its_error_event_in_the_sdk(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    letta: AsyncLetta,
) -> None:
    # The upstream connection breaks after three messages: the sidecar appends stop_reason
    # error, an error event (upstream_error) and [DONE], and the SDK surfaces that error.
    upstream.sse(PATH, [data(m) for m in MESSAGES[:3]] + [RESET])
    async with http.post(sidecar.url + PATH, json={}) as resp:
        view = ClientView(resp.status, dict(resp.headers), await resp.read())
    assert [e.event for e in view.events] == [None, None, None, None, "error", None]
    await sidecar.flushed()
    stream = await letta.runs.messages.stream(view.run_id, starting_after=1)
    got: list[LettaStreamingResponse] = []

    async def consume() -> None:
        async with asyncio.timeout(10):
            async for item in stream:
                got.append(item)

    with pytest.raises(APIStatusError) as caught:
        await consume()
    assert [type(i) for i in got] == [AssistantMessage, AssistantMessage, LettaStopReason]
    assert [i.to_dict()["seq_id"] for i in got] == [2, 3, 4]
    assert got[-1].to_dict()["stop_reason"] == "error"
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error_type"] == "upstream_error"
    assert body["message_type"] == "error_message"
    assert body["seq_id"] == 5
    assert body["run_id"] == view.run_id


async def test_sdk_errors_for_unknown_runs_and_bad_keys(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(replay_token="s3cret-token")
    view = await tee(http, sc, upstream)
    # The SDK sends its api_key as "Authorization: Bearer <key>": the replay token.
    async with AsyncLetta(base_url=sc.url, api_key="s3cret-token", max_retries=0) as good:
        check_items(await sdk_stream(good, view.run_id, 5), view, 5)
        with pytest.raises(NotFoundError) as missing:
            await good.runs.messages.stream("run-does-not-exist", starting_after=0)
        assert isinstance(missing.value.body, dict)
        assert missing.value.body["error"]["type"] == "run_not_found"
    async with AsyncLetta(base_url=sc.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(AuthenticationError):
            await bad.runs.messages.stream(view.run_id, starting_after=0)


async def test_include_pings_reach_the_sdk_as_letta_pings(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(heartbeat_seconds=0.05)
    gate = Gate()
    upstream.sse(PATH, steps(gate))
    async with (
        AsyncLetta(base_url=sc.url, api_key="x", max_retries=0) as client,
        http.post(sc.url + PATH, json={}) as resp,
    ):
        live = LiveReader(resp)
        await live.until(HELD)
        try:
            async with asyncio.timeout(10):
                stream = await client.runs.messages.stream(
                    resp.headers["X-Sidecar-Run-Id"], starting_after=HELD, include_pings=True
                )
                # Nothing new while the upstream is held: the first item is a keepalive.
                first = await anext(stream)
                assert isinstance(first, LettaPing), f"SDK parsed the ping as {type(first)}"
        finally:
            gate.open()
            await live.rest()


async def test_the_sdk_may_send_null_for_its_optional_fields(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    letta: AsyncLetta,
) -> None:
    view = await tee(http, sidecar, upstream)
    items = await sdk_stream(
        letta, view.run_id, 2, batch_size=None, include_pings=None, poll_interval=None
    )
    check_items(items, view, 2)
