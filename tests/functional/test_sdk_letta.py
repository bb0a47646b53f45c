"""The official Letta SDK (``letta_client``) streaming an agent's answer
(``agents.messages.create(agent_id, streaming=True)``) through a real sidecar
(``auto`` dialect) against the demo upstream, compared with the same request straight to the
upstream; and resuming with ``runs.messages.stream(run_id, starting_after=<last seq_id seen>)``
when the upstream numbers ``seq_id`` itself.

The resume rule (README "Run identity"): in the letta dialect every JSON payload's ``seq_id`` is
the sidecar's seq of its event, the number of its ``id:`` line and the replay cursor. Before, an
upstream's own ``seq_id`` was kept: a client resuming after the ``seq_id`` it saw got events again
whenever the upstream's numbering was not the sidecar's (0-based, or not counting its pings).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from letta_client import APIStatusError, AsyncLetta
from letta_client.types.agents.letta_streaming_response import LettaStreamingResponse

from sidecar.keys import RunId
from tests.conftest import Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, data, forced_total, stored_run

AGENT = "agent-demo"
ROUTE = f"/v1/agents/{AGENT}/messages"
PROMPT = "Tell me about server-sent events."


@pytest.fixture
async def via_sidecar(demo_sidecar: Sidecar) -> AsyncIterator[AsyncLetta]:
    async with AsyncLetta(base_url=demo_sidecar.url, api_key="k", max_retries=0) as client:
        yield client


@pytest.fixture
async def direct(demo_upstream: str) -> AsyncIterator[AsyncLetta]:
    async with AsyncLetta(base_url=demo_upstream, api_key="k", max_retries=0) as client:
        yield client


def ids() -> tuple[RunId, str]:
    tag = uuid.uuid4().hex[:12]
    return RunId(f"run-{tag}"), tag


async def agent_stream(
    client: AsyncLetta, scenario: str, run_id: RunId, demo_id: str
) -> tuple[list[dict[str, Any]], BaseException | None]:
    """``agents.messages.stream``: the items as dicts, and what the SDK raised."""
    got: list[dict[str, Any]] = []
    try:
        stream = await client.agents.messages.create(
            AGENT,
            input=PROMPT,
            streaming=True,
            extra_body={"scenario": scenario, "tokens": 5, "delay_ms": 0},
            extra_headers={"X-Run-Id": run_id, "X-Demo-Id": demo_id},
        )
        async for item in stream:
            got.append(item.to_dict())
    except APIStatusError as exc:
        return got, exc
    return got, None


def without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items minus seq_id/run_id: the sidecar fills those, the upstream leaves them null."""
    return [{k: v for k, v in i.items() if k not in ("seq_id", "run_id")} for i in items]


async def test_a_healthy_stream_is_the_same_but_for_the_filled_ids(
    demo_sidecar: Sidecar,
    via_sidecar: AsyncLetta,
    direct: AsyncLetta,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want, want_exc = await agent_stream(direct, "normal", RunId("unused"), demo_id)
    got, got_exc = await agent_stream(via_sidecar, "normal", run_id, demo_id)
    assert want_exc is None
    assert got_exc is None
    assert without_ids(got) == without_ids(want)
    assert [i.get("seq_id") for i in got] == list(range(1, len(got) + 1))
    assert {i.get("run_id") for i in got} == {run_id}

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "completed",
        "end_turn",
        "",
    )
    assert run.meta["dialect"] == "letta"
    assert forced_total(demo_sidecar) == 0


async def test_an_upstream_error_raises_the_same_error_and_is_not_forced(
    demo_sidecar: Sidecar,
    via_sidecar: AsyncLetta,
    direct: AsyncLetta,
    redis_client: redis.asyncio.Redis,
) -> None:
    run_id, demo_id = ids()
    want, want_exc = await agent_stream(direct, "error_then_done", RunId("unused"), demo_id)
    got, got_exc = await agent_stream(via_sidecar, "error_then_done", run_id, demo_id)
    assert type(got_exc) is type(want_exc) is APIStatusError
    assert isinstance(got_exc, APIStatusError)
    assert isinstance(want_exc, APIStatusError)
    assert isinstance(got_exc.body, dict)
    assert isinstance(want_exc.body, dict)
    assert without_ids([got_exc.body]) == without_ids([want_exc.body])
    assert without_ids(got) == without_ids(want)

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["stop_reason"], run.meta["forced_done"]) == (
        "failed",
        "llm_api_error",
        "",
    )
    assert json.loads(run.meta["error"])["error_type"] == "llm_error"
    assert forced_total(demo_sidecar) == 0


@pytest.mark.parametrize(
    ("scenario", "reason"), [("dies", "stream_incomplete"), ("reset", "upstream_error")]
)
async def test_a_stream_that_dies_raises_its_error_event_with_the_forced_reason(
    demo_sidecar: Sidecar,
    via_sidecar: AsyncLetta,
    redis_client: redis.asyncio.Redis,
    scenario: str,
    reason: str,
) -> None:
    run_id, demo_id = ids()
    got, exc = await agent_stream(via_sidecar, scenario, run_id, demo_id)
    assert isinstance(exc, APIStatusError)
    assert isinstance(exc.body, dict)
    assert exc.body["error_type"] == reason
    assert got[-1] == {"message_type": "stop_reason", "stop_reason": "error",
                       "seq_id": len(got), "run_id": run_id}  # fmt: skip

    run = await stored_run(demo_sidecar, redis_client, run_id)
    assert (run.meta["status"], run.meta["forced_done"]) == ("failed", reason)
    assert run.events[-1].data == "[DONE]"
    assert [e.data for e in run.events].count("[DONE]") == 1
    assert forced_total(demo_sidecar) == 1


# -- resume after the seq_id the client saw -------------------------------------------------


def letta_event(n: int, kind: str, seq_id: int | None, **fields: Any) -> bytes:
    payload = {"id": f"message-{n:04d}", "date": "2025-06-01T12:00:00+00:00", "message_type": kind}
    return data({**payload, **fields, "seq_id": seq_id, "run_id": "run-upstream-own"})


def ping(n: int) -> bytes:
    # Letta's keepalive: not a message, so its server does not number it.
    return data({"id": f"ping-{n}", "date": "2025-06-01T12:00:00+00:00", "message_type": "ping"})


def numbered_stream(first: int, pings: bool) -> list[Step]:
    """41 events, numbered by the upstream from ``first`` (pings, when mixed in, unnumbered)."""
    out: list[Step] = []
    number = first
    for n in range(36):
        if pings and n % 12 == 5:
            out.append(ping(n))
        out.append(letta_event(n, "assistant_message", number, content=f"word{n} "))
        number += 1
    stop = {"message_type": "stop_reason", "stop_reason": "end_turn", "seq_id": number}
    out += [data(stop), data({"message_type": "usage_statistics", "seq_id": number + 1}), DONE]
    return out


@pytest.mark.parametrize(
    ("first", "pings"),
    [(1, True), (0, False), (0, True)],
    ids=["1-based-with-pings", "0-based", "0-based-with-pings"],
)
async def test_resuming_after_the_seq_id_seen_gives_every_event_exactly_once(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    first: int,
    pings: bool,
) -> None:
    demo_sidecar = await make_sidecar()
    steps = numbered_stream(first, pings)
    upstream.sse(ROUTE, steps)
    async with AsyncLetta(base_url=demo_sidecar.url, api_key="k", max_retries=0) as client:
        for cut in (4, 7, 20, 30):
            run_id, _ = ids()
            # The live client reads `cut` items, keeps the last seq_id it saw, and drops.
            stream = await client.agents.messages.create(
                AGENT,
                input=PROMPT,
                streaming=True,
                extra_headers={"X-Run-Id": run_id},
            )
            live: list[LettaStreamingResponse] = []
            async for item in stream:
                live.append(item)
                if len(live) == cut:
                    break
            await stream.close()
            await demo_sidecar.flushed()
            seen = live[-1].to_dict()
            # The client resumes with what it saw: the upstream's own run id (the sidecar finds
            # the run by it) and the seq_id.
            assert seen["run_id"] == "run-upstream-own"
            cursor = seen["seq_id"]
            assert isinstance(cursor, int)
            resumed = await client.runs.messages.stream(seen["run_id"], starting_after=cursor)
            rest = [item async for item in resumed]
            everything = await client.runs.messages.stream(run_id, starting_after=0)
            full = [item.to_dict() async for item in everything]
            got = [i.to_dict() for i in live] + [i.to_dict() for i in rest]
            assert got == full, f"cut after {cut} items"
            assert len(full) == len(steps) - 1  # every event but [DONE], once
            assert [i["seq_id"] for i in full] == list(range(1, len(full) + 1))
