"""The demo upstream (``sidecar/demo/upstream.py``) over real HTTP: each scenario's exact events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.demo.upstream import SCENARIOS
from sidecar.sse import Comment, Event, Item, SSEDecoder

STREAM = "/v1/agents/agent-demo/messages/stream"
TOKENS = 3
# ping, reasoning, then TOKENS assistant chunks: what every scenario starts with.
PROLOGUE = ["comment: ping", "reasoning_message", *["assistant_message"] * TOKENS]
ENDINGS: dict[str, list[str]] = {
    "normal": ["stop_reason: end_turn", "usage_statistics", "[DONE]"],
    "error_then_done": ["stop_reason: llm_api_error", "error: llm_error", "[DONE]"],
    "dies": [],
    "error_no_done": ["stop_reason: error", "error: llm_error"],
    "stop_no_done": ["stop_reason: end_turn"],
}


@pytest.fixture
def base_url(demo_upstream: str) -> str:
    return demo_upstream


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def read_items(resp: aiohttp.ClientResponse, into: list[Item]) -> None:
    """Decode the response body into ``into`` as it arrives (so a broken stream keeps its head)."""
    decoder = SSEDecoder()
    async for chunk in resp.content.iter_any():
        into.extend(decoder.feed(chunk))


def describe(item: Item) -> str:
    """A short name for an SSE item, to compare whole sequences at a glance."""
    if isinstance(item, Comment):
        return f"comment:{item.text}"
    assert item.data is not None
    if item.data == "[DONE]":
        assert item.event is None
        return "[DONE]"
    payload = json.loads(item.data)
    kind = payload["message_type"]
    if item.event == "error":
        assert kind == "error_message"
        return f"error: {payload['error_type']}"
    assert item.event is None
    if kind == "stop_reason":
        return f"stop_reason: {payload['stop_reason']}"
    return str(kind)


def payloads(items: list[Item], message_type: str) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if isinstance(item, Event) and item.data and item.data != "[DONE]":
            payload = json.loads(item.data)
            if payload["message_type"] == message_type:
                out.append(payload)
    return out


@pytest.mark.parametrize("scenario", list(ENDINGS))
async def test_scenario_event_sequence(
    base_url: str, http: aiohttp.ClientSession, scenario: str
) -> None:
    items: list[Item] = []
    body = {"scenario": scenario, "tokens": TOKENS, "delay_ms": 0}
    async with http.post(base_url + STREAM, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "X-Run-Id" not in resp.headers
        await read_items(resp, items)  # ends cleanly: no exception, even without a terminal

    assert [describe(i) for i in items] == PROLOGUE + ENDINGS[scenario]


async def test_message_payloads_look_like_letta(base_url: str, http: aiohttp.ClientSession) -> None:
    items: list[Item] = []
    async with http.post(base_url + STREAM, json={"tokens": TOKENS, "delay_ms": 0}) as resp:
        await read_items(resp, items)

    messages = payloads(items, "reasoning_message") + payloads(items, "assistant_message")
    for payload in messages:
        # Null on purpose: the sidecar fills them.
        assert payload["seq_id"] is None
        assert payload["run_id"] is None
        assert payload["id"].startswith("message-")
        assert payload["date"]
    chunks = payloads(items, "assistant_message")
    assert len({p["id"] for p in chunks}) == 1  # the chunks of one message share its id
    assert "".join(p["content"] for p in chunks) == "Server-sent events carry "
    assert payloads(items, "stop_reason") == [
        {"message_type": "stop_reason", "stop_reason": "end_turn"}
    ]
    (usage,) = payloads(items, "usage_statistics")
    assert usage["completion_tokens"] == TOKENS


async def test_error_event_payload(base_url: str, http: aiohttp.ClientSession) -> None:
    items: list[Item] = []
    body = {"scenario": "error_then_done", "tokens": 1, "delay_ms": 0}
    async with http.post(base_url + STREAM, json=body) as resp:
        await read_items(resp, items)

    (error,) = [i for i in items if isinstance(i, Event) and i.event == "error"]
    assert error.data is not None
    payload = json.loads(error.data)
    assert payload["message_type"] == "error_message"
    assert payload["error_type"] == "llm_error"
    assert payload["message"]
    assert payload["detail"]


async def test_reset_cuts_the_connection_mid_stream(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    items: list[Item] = []
    body = {"scenario": "reset", "tokens": TOKENS, "delay_ms": 0}
    async with http.post(base_url + STREAM, json=body) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_items(resp, items)

    assert [describe(i) for i in items] == PROLOGUE


async def test_defaults_and_get_route(base_url: str, http: aiohttp.ClientSession) -> None:
    items: list[Item] = []
    async with http.get(base_url + "/v1/stream") as resp:
        assert resp.status == 200
        await read_items(resp, items)

    assert [describe(i) for i in items] == [
        "comment: ping",
        "reasoning_message",
        *["assistant_message"] * 12,
        *ENDINGS["normal"],
    ]


async def test_query_wins_over_body(base_url: str, http: aiohttp.ClientSession) -> None:
    items: list[Item] = []
    url = base_url + STREAM + "?scenario=stop_no_done&tokens=1&delay_ms=0"
    async with http.post(url, json={"scenario": "normal", "tokens": 5}) as resp:
        await read_items(resp, items)

    assert [describe(i) for i in items] == [
        "comment: ping",
        "reasoning_message",
        "assistant_message",
        "stop_reason: end_turn",
    ]


async def test_body_run_id_comes_back_as_header(base_url: str, http: aiohttp.ClientSession) -> None:
    body = {"run_id": "run-from-body", "tokens": 0, "delay_ms": 0}
    async with http.post(base_url + STREAM, json=body) as resp:
        assert resp.headers["X-Run-Id"] == "run-from-body"
        await resp.read()


async def test_unknown_scenario_is_a_400_listing_the_valid_ones(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(base_url + STREAM, json={"scenario": "explode"}) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["type"] == "bad_scenario"
    assert "explode" in error["message"]
    for scenario in SCENARIOS:
        assert scenario in error["message"]

    async with http.get(base_url + "/v1/stream?scenario=nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "bad_scenario"


@pytest.mark.parametrize(
    ("body", "query"),
    [
        ({"tokens": "many"}, ""),
        ({"delay_ms": -1}, ""),
        ({}, "?tokens=x"),
        ({"run_id": 7}, ""),
    ],
)
async def test_bad_parameters_are_a_400(
    base_url: str, http: aiohttp.ClientSession, body: dict[str, Any], query: str
) -> None:
    async with http.post(base_url + STREAM + query, json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "bad_request"


async def test_non_json_body_is_a_400(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(base_url + STREAM, data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "bad_request"


async def test_health(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(base_url + "/v1/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_echo(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(
        base_url + "/v1/echo?hello=world", data=b"12345", headers={"X-Demo": "yes"}
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/echo"
    assert echoed["query"] == {"hello": "world"}
    assert echoed["headers"]["X-Demo"] == "yes"
    assert echoed["body_length"] == 5


async def test_agents(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(base_url + "/v1/agents") as resp:
        assert resp.status == 200
        agents = await resp.json()
    assert isinstance(agents, list)
    assert "agent-demo" in [a["id"] for a in agents]
