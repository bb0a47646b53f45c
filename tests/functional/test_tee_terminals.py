"""The tee through the real proxy: every row of DESIGN.md's terminal table, and the stream rules.

Each test drives a real upstream, a real sidecar and a real Redis, then checks the same
invariants (``check_run``): live bytes == stored bytes, one ``[DONE]`` and it is last, seq ids
1..N with entry ids ``<seq>-0``, ``id: <seq>`` on every event, the run's meta, and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from sidecar.app import PROXY
from sidecar.keys import RunId
from sidecar.sse import Event, SSEDecoder
from sidecar.tee import KEEPALIVE
from tests.conftest import HANG, RESET, Gate, Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import (
    DONE,
    ClientView,
    LiveReader,
    data,
    error,
    eventually,
    meta,
    nonzero,
    payloads,
    read_events,
    read_until_bytes,
    samples,
    stop,
    stored,
    stream,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"
FORCED = "sse_sidecar_forced_done_total"
FINISHED = "sse_sidecar_runs_finished_total"
TRANSITIONS = "sse_sidecar_stream_transitions_total"


def filled(payload: dict[str, Any], seq: int, run_id: str) -> dict[str, Any]:
    """``payload`` as the letta dialect stores it: seq_id its seq, a null/missing run_id filled."""
    out = dict(payload)
    out["seq_id"] = seq
    if out.get("run_id") is None:
        out["run_id"] = run_id
    return out


def ev(seq: int, payload: Any, *, event: str | None = None) -> bytes:
    """The exact bytes of one event as the sidecar sends and stores it."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}id: {seq}\ndata: {text}\n\n".encode()


def msg(text: str) -> dict[str, Any]:
    return {"message_type": "assistant_message", "content": text}


def stop_payload(reason: str) -> dict[str, Any]:
    return {"message_type": "stop_reason", "stop_reason": reason}


async def run_stream(
    upstream: Upstream, http: aiohttp.ClientSession, url: str, steps: list[Step]
) -> ClientView:
    upstream.sse(PATH, steps)
    view = await stream(http, url + PATH, json={"messages": []})
    assert view.status == 200
    assert view.headers["Content-Type"].startswith("text/event-stream")
    return view


async def check_run(
    sc: Sidecar,
    redis_client: redis.asyncio.Redis,
    run_id: RunId,
    *,
    status: str,
    stop_reason: str,
    forced_done: str | None,
    stop_label: str | None = None,
    live: bytes | None = None,
) -> list[dict[str, str]]:
    """The invariants every run ends with; returns the stored rows."""
    await sc.flushed()
    now_ms = int(time.time() * 1000)
    rows = await stored(redis_client, run_id)
    n = len(rows)
    assert n >= 1
    if live is not None:
        # Live == replay, synthesized events included.
        assert live == "".join(r["data"] for r in rows).encode()
    assert [r["seq_id"] for r in rows] == [str(i) for i in range(1, n + 1)]
    assert [r["id"] for r in rows] == [f"{i}-0" for i in range(1, n + 1)]
    assert [r["complete"] for r in rows] == ["false"] * (n - 1) + ["true"]
    events = [
        item
        for r in rows
        for item in SSEDecoder().feed(r["data"].encode())
        if isinstance(item, Event) and item.data is not None  # (a retry-only block is none)
    ]
    assert len(events) == n  # one event per entry
    assert [e.id for e in events] == [str(i) for i in range(1, n + 1)]
    assert [e.data for e in events].count("[DONE]") == 1
    assert events[-1].data == "[DONE]"
    assert events[-1].event is None
    m = await meta(redis_client, run_id)
    assert m["status"] == status
    assert m["stop_reason"] == stop_reason
    assert m["forced_done"] == (forced_done or "")
    assert m["last_seq"] == str(n)
    assert int(m["created_ms"]) <= int(m["finished_ms"]) <= int(m["updated_ms"]) <= now_ms
    forced = nonzero(samples(sc.metrics.registry, FORCED))
    if forced_done is None:
        assert forced == {}
    else:
        assert forced == {(("dialect", "letta"), ("reason", forced_done)): 1.0}
    label = stop_label if stop_label is not None else (stop_reason or "none")
    assert nonzero(samples(sc.metrics.registry, FINISHED)) == {
        (("dialect", "letta"), ("status", status), ("stop_reason", label)): 1.0
    }
    assert m["dialect"] == "letta"
    assert sc.metric("sse_sidecar_runs_active") == 0
    assert sc.metric("sse_sidecar_stream_events_total") == n
    return rows


# -- the terminal table ---------------------------------------------------------------------


async def test_natural_done(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(
        upstream, http, sc.url, [token("Hel"), token("lo"), stop("end_turn"), DONE]
    )
    r = view.run_id
    assert view.body == (
        ev(1, filled(msg("Hel"), 1, r))
        + ev(2, filled(msg("lo"), 2, r))
        + ev(3, filled(stop_payload("end_turn"), 3, r))
        + b"id: 4\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )
    assert nonzero(samples(sc.metrics.registry, TRANSITIONS)) == {
        (("transition", "saw_stop_reason"),): 1.0,
        (("transition", "saw_done"),): 1.0,
    }
    assert sc.metric("sse_sidecar_stream_bytes_total") == len(view.body)
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 1


async def test_stop_reason_without_done_appends_done(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [token("a"), stop("end_turn")])
    r = view.run_id
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(stop_payload("end_turn"), 2, r))
        + b"id: 3\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done="missing_done",
        live=view.body,
    )


async def test_error_without_done_appends_done_and_fails(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [token("a"), error("overloaded")])
    r = view.run_id
    up_error = {"message_type": "error_message", "error_type": "llm_error", "message": "overloaded"}
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(up_error, 2, r), event="error")
        + b"id: 3\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="",
        forced_done="missing_done_after_error",
        stop_label="none",
        live=view.body,
    )
    stored_error = json.loads((await meta(redis_client, r))["error"])
    assert {k: stored_error[k] for k in up_error} == up_error
    assert nonzero(samples(sc.metrics.registry, TRANSITIONS)) == {
        (("transition", "saw_error"),): 1.0
    }


async def test_clean_eof_without_terminal_is_stream_incomplete(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [token("a"), token("b")])
    r = view.run_id
    synth_error = {
        "message_type": "error_message",
        "error_type": "stream_incomplete",
        "message": "the upstream closed the stream without a stop reason, an error or [DONE]",
        "detail": None,
    }
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(msg("b"), 2, r))
        + ev(3, filled(stop_payload("error"), 3, r))
        + ev(4, filled(synth_error, 4, r), event="error")
        + b"id: 5\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done="stream_incomplete",
        live=view.body,
    )
    m = await meta(redis_client, r)
    assert json.loads(m["error"])["error_type"] == "stream_incomplete"


def assert_failure_tail(view: ClientView, first_seq: int, error_type: str) -> dict[str, Any]:
    """The three synthesized events of a failed stream; returns the error payload."""
    events = view.events
    r = view.run_id
    tail = events[first_seq - 1 :]
    assert [e.id for e in tail] == [str(first_seq), str(first_seq + 1), str(first_seq + 2)]
    assert [e.event for e in tail] == [None, "error", None]
    assert json.loads(tail[0].data or "") == filled(stop_payload("error"), first_seq, r)
    err = json.loads(tail[1].data or "")
    assert err["message_type"] == "error_message"
    assert err["error_type"] == error_type
    assert err["seq_id"] == first_seq + 1
    assert err["run_id"] == r
    assert tail[2].data == "[DONE]"
    return dict(err)


async def test_upstream_reset_mid_stream_is_upstream_error(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), gate, RESET])
    async with http.post(sc.url + PATH, json={}) as resp:
        first = await read_events(resp, 2)  # the tee relayed both before the reset
        gate.open()
        rest = await resp.read()
        view = ClientView(resp.status, dict(resp.headers), first + rest)
    r = view.run_id
    assert view.body.startswith(ev(1, filled(msg("a"), 1, r)) + ev(2, filled(msg("b"), 2, r)))
    assert len(view.events) == 5
    err = assert_failure_tail(view, 3, "upstream_error")
    assert err["message"] == "the connection to the upstream failed before [DONE]"
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done="upstream_error",
        live=view.body,
    )


async def test_events_delivered_right_before_a_reset_are_kept(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """The upstream writes two events and dies at once, while the sidecar is still claiming the
    run in Redis: the bytes are in the sidecar's buffer when the connection error arrives (and
    aiohttp raises that error before handing out buffered bytes), so they must still reach the
    client and the store, before the upstream_error terminal."""
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [token("a"), token("b"), RESET])
    r = view.run_id
    assert view.body.startswith(ev(1, filled(msg("a"), 1, r)) + ev(2, filled(msg("b"), 2, r)))
    assert len(view.events) == 5
    assert_failure_tail(view, 3, "upstream_error")
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done="upstream_error",
        live=view.body,
    )


async def test_read_timeout_is_upstream_timeout(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(upstream_read_timeout_seconds=0.3)
    view = await run_stream(upstream, http, sc.url, [token("a"), HANG])
    r = view.run_id
    assert view.body.startswith(ev(1, filled(msg("a"), 1, r)))
    assert len(view.events) == 4
    err = assert_failure_tail(view, 2, "upstream_timeout")
    assert err["message"] == "the upstream sent nothing within the read timeout"
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done="upstream_timeout",
        live=view.body,
    )


async def test_a_silent_upstream_gets_the_client_keep_alive_comments(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # An upstream that stalls after its error event holds the run until the read timeout: the
    # client must hear from the sidecar meanwhile, or a proxy in between closes the stream.
    sc = await make_sidecar(heartbeat_seconds=0.2, upstream_read_timeout_seconds=1.5)
    upstream.sse("/v1/stalls", [token("a"), error("overloaded"), HANG])
    async with http.post(sc.url + "/v1/stalls", json={}) as resp:
        reader = LiveReader(resp)
        await reader.until(2)
        # Three keep-alives while the upstream says nothing (0.2 s apart, before the timeout).
        await read_until_bytes(reader, KEEPALIVE, count=3, timeout=5)
        body = await reader.rest()
    run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    # The comments went to the client only: the stored run is the events, and it ends with the
    # read timeout's terminal after the upstream's own error.
    await check_run(
        sc,
        redis_client,
        run_id,
        status="failed",
        stop_reason="error",
        forced_done="upstream_timeout",
        live=body.replace(KEEPALIVE, b""),
    )


async def test_stop_reason_error_then_error_event_then_done_is_a_natural_end(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """The lesson: the service's own [DONE] follows its error; nothing is forced."""
    sc = await make_sidecar()
    view = await run_stream(
        upstream, http, sc.url, [token("a"), stop("error"), error("overloaded"), DONE]
    )
    r = view.run_id
    up_error = {"message_type": "error_message", "error_type": "llm_error", "message": "overloaded"}
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(stop_payload("error"), 2, r))
        + ev(3, filled(up_error, 3, r), event="error")
        + b"id: 4\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done=None,
        live=view.body,
    )
    assert nonzero(samples(sc.metrics.registry, FORCED)) == {}
    assert sc.metric(TRANSITIONS, transition="saw_done_after_error") == 1
    assert sc.metric(TRANSITIONS, transition="saw_error") == 1
    assert sc.metric(TRANSITIONS, transition="saw_done") == 1
    assert sc.metric(TRANSITIONS, transition="saw_stop_reason") == 1
    m = await meta(redis_client, r)
    assert m["forced_done"] == ""
    assert m["status"] == "failed"
    err = json.loads(m["error"])
    assert {k: err[k] for k in up_error} == up_error


async def test_done_without_stop_reason_or_error_is_failed_in_letta_dialect(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [token("a"), DONE])
    await check_run(
        sc,
        redis_client,
        view.run_id,
        status="failed",
        stop_reason="",
        forced_done=None,
        stop_label="none",
        live=view.body,
    )


async def test_unknown_stop_reason_is_completed_with_label_other(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [stop("brand_new_reason"), DONE])
    await check_run(
        sc,
        redis_client,
        view.run_id,
        status="completed",
        stop_reason="brand_new_reason",
        forced_done=None,
        stop_label="other",
        live=view.body,
    )


# -- what counts as an event, and what the tee relays ---------------------------------------


async def test_events_after_done_are_neither_relayed_nor_stored(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    # One write: the late events arrive in the same chunk as the [DONE].
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [token("a"), stop("end_turn") + DONE + token("late") + DONE, token("later"), DONE],
    )
    r = view.run_id
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(stop_payload("end_turn"), 2, r))
        + b"id: 3\ndata: [DONE]\n\n"
    )
    rows = await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )
    assert len(rows) == 3
    assert not any("late" in row["data"] for row in rows)


async def test_done_inside_message_text_is_not_a_terminal(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    tricky = "data: [DONE]\n\ndata: [DONE]"
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [
            token(tricky),
            b"data: not json\ndata: [DONE]\n\n",  # a multi-line event whose last line is [DONE]
            b"data: [DONE] is what I said\n\n",
            stop("end_turn"),
            DONE,
        ],
    )
    r = view.run_id
    assert view.body == (
        ev(1, filled(msg(tricky), 1, r))
        + b"id: 2\ndata: not json\ndata: [DONE]\n\n"
        + b"id: 3\ndata: [DONE] is what I said\n\n"
        + ev(4, filled(stop_payload("end_turn"), 4, r))
        + b"id: 5\ndata: [DONE]\n\n"
    )
    assert json.loads(view.events[0].data or "")["content"] == tricky
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )


async def test_comments_are_relayed_live_but_not_stored_or_numbered(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [b": ping\n\n", token("a"), b": keep-alive\n", token("b"), stop("end_turn"), DONE],
    )
    r = view.run_id
    events = (
        ev(1, filled(msg("a"), 1, r)),
        ev(2, filled(msg("b"), 2, r)),
        ev(3, filled(stop_payload("end_turn"), 3, r)),
        b"id: 4\ndata: [DONE]\n\n",
    )
    # Comments are relayed as lone lines (the upstream's blank line after one is not).
    assert view.body == (
        b": ping\n" + events[0] + b": keep-alive\n" + events[1] + events[2] + events[3]
    )
    rows = await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
    )
    assert [row["data"].encode() for row in rows] == list(events)


async def test_oversized_event_ends_the_run_as_upstream_error(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(max_event_bytes=1024)
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [token("a"), token("b"), token("x" * 2000), token("c"), stop("end_turn"), DONE],
    )
    r = view.run_id
    assert view.body.startswith(ev(1, filled(msg("a"), 1, r)) + ev(2, filled(msg("b"), 2, r)))
    assert len(view.events) == 5
    err = assert_failure_tail(view, 3, "upstream_error")
    assert "max_event_bytes (1024 bytes)" in err["detail"]
    assert b"xxxx" not in view.body
    await check_run(
        sc,
        redis_client,
        r,
        status="failed",
        stop_reason="error",
        forced_done="upstream_error",
        live=view.body,
    )


async def test_letta_fill_of_seq_id_and_run_id(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    kept = b'{"message_type":  "assistant_message", "seq_id": 3, "run_id": "elsewhere", "x": 1.50}'
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [
            data({"message_type": "assistant_message", "seq_id": None, "run_id": None, "c": "n"}),
            data({"message_type": "assistant_message", "c": "missing"}),
            b"data: " + kept + b"\n\n",
            data({"message_type": "assistant_message", "seq_id": 40, "c": "half"}),
            data({"run_id": "mine", "c": "other half"}),
            data([1, None]),
            data("plain text, not JSON"),
            stop("end_turn"),
            DONE,
        ],
    )
    r = view.run_id
    assert payloads(view.events) == [
        {"message_type": "assistant_message", "seq_id": 1, "run_id": r, "c": "n"},
        {"message_type": "assistant_message", "c": "missing", "seq_id": 2, "run_id": r},
        json.loads(kept),
        # The upstream's own seq_id is replaced: seq_id is the replay cursor (the event's seq).
        {"message_type": "assistant_message", "seq_id": 4, "c": "half", "run_id": r},
        {"run_id": "mine", "c": "other half", "seq_id": 5},
        [1, None],
        "plain text, not JSON",
        filled(stop_payload("end_turn"), 8, r),
        "[DONE]",
    ]
    # An event that carries the right ids keeps its exact bytes (no re-serialisation).
    assert b"id: 3\ndata: " + kept + b"\n\n" in view.body
    assert b"id: 6\ndata: [1, null]\n\n" in view.body
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )


async def test_multiline_data_and_crlf_line_endings_survive(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(
        upstream,
        http,
        sc.url,
        [
            b"data: line one\ndata: line two\n\n",
            b"event: thought\r\ndata: first\r\ndata:\r\ndata: third\r\n\r\n",
            b'data: {"message_type": "stop_reason",\r\ndata:  "stop_reason": "end_turn"}\r\n\r\n',
            b"data: [DONE]\r\n\r\n",
        ],
    )
    r = view.run_id
    assert view.body[: view.body.index(b"id: 3")] == (
        b"id: 1\ndata: line one\ndata: line two\n\n"
        b"event: thought\nid: 2\ndata: first\ndata: \ndata: third\n\n"
    )
    events = view.events
    assert [e.data for e in events[:2]] == ["line one\nline two", "first\n\nthird"]
    assert events[1].event == "thought"
    assert json.loads(events[2].data or "") == filled(stop_payload("end_turn"), 3, r)
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )


# -- the client leaves mid-stream -----------------------------------------------------------


async def test_client_disconnect_keeps_teeing_to_the_end(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(
        PATH,
        [token("a"), token("b"), gate, token("c"), token("d"), stop("end_turn"), DONE],
    )
    resp = await http.post(sc.url + PATH, json={})
    run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    first = await read_events(resp, 2)
    await gate.reached.wait()
    resp.close()
    gate.open()
    rows = await check_run(
        sc,
        redis_client,
        run_id,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
    )
    assert upstream.finished.is_set()
    assert [json.loads(row["data"].split("data: ", 1)[1])["content"] for row in rows[:4]] == [
        "a",
        "b",
        "c",
        "d",
    ]
    assert len(rows) == 6
    assert "".join(row["data"] for row in rows).encode().startswith(first)
    assert sc.metric("sse_sidecar_client_disconnects_total") == 1


async def test_client_disconnect_with_cancel_policy_cancels_the_run(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(on_client_disconnect="cancel")
    leave = Gate()
    upstream.sse(PATH, [token("a"), token("b"), leave, token("c"), stop("end_turn"), DONE])
    resp = await http.post(sc.url + PATH, json={})
    run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    first = await read_events(resp, 2)
    await leave.reached.wait()
    # The upstream is silent now; the sidecar learns of the departure from the closed
    # connection itself (its handler is cancelled), not from a failed write.
    resp.close()
    rows = await check_run(
        sc,
        redis_client,
        run_id,
        status="cancelled",
        stop_reason="cancelled",
        forced_done="cancelled",
    )
    assert "".join(row["data"] for row in rows).encode().startswith(first)
    assert [row["data"].encode() for row in rows] == [
        ev(1, filled(msg("a"), 1, run_id)),
        ev(2, filled(msg("b"), 2, run_id)),
        ev(3, filled(stop_payload("cancelled"), 3, run_id)),
        b"id: 4\ndata: [DONE]\n\n",
    ]
    assert sc.metric("sse_sidecar_client_disconnects_total") == 1
    leave.open()  # the upstream's next write meets the connection the sidecar closed
    await asyncio.wait_for(upstream.disconnected.wait(), 5)
    assert not upstream.finished.is_set()


@pytest.mark.parametrize("reason", ["end_turn", "max_steps", "requires_approval", "tool_rule"])
async def test_completed_stop_reasons(
    reason: str,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    view = await run_stream(upstream, http, sc.url, [stop(reason), DONE])
    await check_run(
        sc,
        redis_client,
        view.run_id,
        status="completed",
        stop_reason=reason,
        forced_done=None,
        live=view.body,
    )


async def test_gzip_encoded_event_stream_is_decoded_for_the_tee(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gz = zlib.compressobj(wbits=31)
    steps: list[Step] = [
        gz.compress(chunk) + gz.flush(zlib.Z_SYNC_FLUSH)
        for chunk in (token("a"), token("b"), stop("end_turn") + DONE)
    ]
    steps.append(gz.flush())
    upstream.sse(PATH, steps, headers={"Content-Encoding": "gzip"})
    view = await stream(http, sc.url + PATH, json={})
    assert view.status == 200
    assert "Content-Encoding" not in view.headers  # the client gets the decoded events
    r = view.run_id
    assert view.body == (
        ev(1, filled(msg("a"), 1, r))
        + ev(2, filled(msg("b"), 2, r))
        + ev(3, filled(stop_payload("end_turn"), 3, r))
        + b"id: 4\ndata: [DONE]\n\n"
    )
    await check_run(
        sc,
        redis_client,
        r,
        status="completed",
        stop_reason="end_turn",
        forced_done=None,
        live=view.body,
    )


async def test_runs_one_after_another_reuse_one_upstream_connection(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """A run that ended at its terminal hands its upstream connection back for the next one
    (keep-alive), whether the body's end came in the terminal's read or after it."""
    sc = await make_sidecar()
    peers: list[Any] = []
    statuses = []
    for last_read_ends_body in (True, False, True, False):
        gate = Gate()

        async def handler(
            request: web.Request, gate: Gate = gate, together: bool = last_read_ends_body
        ) -> web.StreamResponse:
            assert request.transport is not None
            peers.append(request.transport.get_extra_info("peername"))
            resp = web.StreamResponse()
            resp.content_type = "text/event-stream"
            await resp.prepare(request)
            await resp.write(token("a"))
            await resp.write(stop("end_turn"))
            await gate.event.wait()  # the tee is reading the body as it comes by now
            if together:
                await resp.write_eof(DONE)  # the terminal and the body's end in one write
            else:
                await resp.write(DONE)
                await resp.write_eof()
            return resp

        upstream.raw(PATH, handler)
        async with http.post(sc.url + PATH, json={"messages": []}) as resp:
            reader = LiveReader(resp)
            await reader.until(2)
            gate.open()
            body = await reader.rest()
        assert body.endswith(b"data: [DONE]\n\n")
        await sc.flushed()

        async def settled() -> bool:
            # The tee's task lasts until its upstream response is read to its end and the
            # connection handed back (after the client got its last byte).
            return not sc.app[PROXY]._tasks

        await eventually(settled, what="the tee's upstream response settled")
        run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
        statuses.append((await meta(redis_client, run_id))["status"])
    assert statuses == ["completed"] * 4
    assert len(peers) == 4
    assert len(set(peers)) == 1, peers
