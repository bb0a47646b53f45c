"""The replay API through a real sidecar, a real upstream and a real Redis (DESIGN.md "The API").

A replay returns the events after a cursor, byte for byte what the live client received, then
follows the run live and ends right after its ``[DONE]``. Refusals are JSON errors with exact
statuses; every request is counted in ``replay_requests_total{outcome}``. A run whose producer
died (its lease expired) is ended with the ``producer_lost`` terminal by whoever reads it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from sidecar.app import STORE
from sidecar.errors import StoreUnavailable
from sidecar.keys import Keys, RunId
from sidecar.tee import KEEPALIVE
from tests.conftest import Gate, RedisServer, Sidecar, SidecarFactory, Step, Upstream, free_port
from tests.functional.helpers import (
    DONE,
    ClientView,
    LiveReader,
    error,
    eventually,
    meta,
    read_until_bytes,
    redis_keys,
    replay_outcomes,
    split_events,
    stop,
    stored,
    stored_count,
    stream,
    token,
    write_run,
)

PATH = "/v1/agents/agent-1/messages/stream"
P = "sse_sidecar_"
PING = b": ping\n"
PRODUCER_LOST_MESSAGE = "the sidecar producing this run stopped renewing its lease"

RUNS: dict[str, list[Step]] = {
    "normal": [token("Hel"), token("lo"), stop("end_turn"), DONE],
    "error_then_done": [token("a"), stop("llm_api_error"), error("overloaded"), DONE],
    "stream_incomplete": [token("a"), token("b")],
}


# -- helpers --------------------------------------------------------------------------------


def stream_path(run_id: str) -> str:
    return f"/sidecar/v1/runs/{run_id}/stream"


def outcomes(sc: Sidecar) -> dict[str, float]:
    return replay_outcomes(sc.metrics.registry)


def error_body(view: ClientView) -> dict[str, Any]:
    assert view.headers["Content-Type"].startswith("application/json"), view.headers
    body: dict[str, Any] = json.loads(view.body)
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    return err


async def replay(
    http: aiohttp.ClientSession, sc: Sidecar, run_id: str, *, method: str = "GET", **kw: Any
) -> ClientView:
    return await stream(http, sc.url + stream_path(run_id), method=method, **kw)


async def finished_run(
    upstream: Upstream, http: aiohttp.ClientSession, sc: Sidecar, steps: Sequence[Step]
) -> ClientView:
    """One run through the proxy, read to its end by the live client, and fully stored."""
    upstream.sse(PATH, steps)
    view = await stream(http, sc.url + PATH, json={"messages": []})
    assert view.status == 200
    await sc.flushed()
    return view


@contextlib.asynccontextmanager
async def streaming_run(
    http: aiohttp.ClientSession, sc: Sidecar, redis_client: redis.asyncio.Redis
) -> AsyncIterator[tuple[RunId, LiveReader]]:
    """A run streaming through ``sc`` (on PATH) with its live client, its first event in and
    stored."""
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(1)
        await stored_count(redis_client, run_id, 1)
        yield run_id, live


def check_whole(body: bytes) -> list[bytes]:
    """A complete run's body: ids 1..N on every event, one [DONE], and it is the last event."""
    events = split_events(body)
    ids = [e.split(b"id: ", 1)[1].split(b"\n", 1)[0] for e in events]
    assert ids == [str(i).encode() for i in range(1, len(events) + 1)]
    assert [e.endswith(b"data: [DONE]\n\n") for e in events].count(True) == 1
    assert events[-1] == f"id: {len(events)}\ndata: [DONE]\n\n".encode()
    return events


def ev(seq: int, payload: dict[str, Any], *, event: str | None = None) -> bytes:
    """The exact bytes of one stored event (compact JSON, as the letta dialect renders it)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}id: {seq}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def msg(text: str, seq: int, run_id: str) -> dict[str, Any]:
    return {"message_type": "assistant_message", "content": text, "seq_id": seq, "run_id": run_id}


def producer_lost_tail(first: int, run_id: str) -> bytes:
    """The terminal a reader appends for a run (without a stop reason or an error) that lost its
    producer, starting at seq ``first``."""
    stop_event = {"message_type": "stop_reason", "stop_reason": "error"}
    lost = {
        "message_type": "error_message",
        "error_type": "producer_lost",
        "message": PRODUCER_LOST_MESSAGE,
        "detail": None,
    }
    return (
        ev(first, {**stop_event, "seq_id": first, "run_id": run_id})
        + ev(first + 1, {**lost, "seq_id": first + 1, "run_id": run_id}, event="error")
        + f"id: {first + 2}\ndata: [DONE]\n\n".encode()
    )


async def write_orphan(
    redis_client: redis.asyncio.Redis,
    run_id: RunId,
    n: int,
    lease_until_ms: int,
    *,
    indexed_ms: int | None = None,
) -> bytes:
    """A running run of ``n`` events whose producer holds a lease until ``lease_until_ms``,
    written straight into Redis in the writer's format, and in the lease index (with
    ``indexed_ms``, else the lease); returns the stored bytes."""
    await redis_client.zadd(
        "sse:run:leases", {run_id: lease_until_ms if indexed_ms is None else indexed_ms}
    )
    events = [ev(i, msg(f"t{i}", i, run_id)) for i in range(1, n + 1)]
    now_ms = int(time.time() * 1000)
    await write_run(
        redis_client,
        run_id,
        events,
        {
            "status": "running",
            "producer": "gone-host:4242:0123456789ab",
            "lease_until_ms": str(lease_until_ms),
            "created_ms": str(now_ms - 5000),
            "updated_ms": str(now_ms - 5000),
            "route": "proxy",
        },
    )
    return b"".join(events)


def forced_total(sidecars: list[Sidecar], reason: str) -> float:
    return sum(sc.metric(P + "forced_done_total", reason=reason) for sc in sidecars)


# -- a finished run, replayed ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RUNS))
async def test_replay_from_zero_equals_the_live_body(
    kind: str,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    live = await finished_run(upstream, http, sc, RUNS[kind])
    events = check_whole(live.body)
    got = await replay(http, sc, live.run_id)
    assert got.status == 200
    assert got.headers["Content-Type"] == "text/event-stream"
    assert got.headers["Cache-Control"] == "no-cache"
    assert got.headers["X-Sidecar-Run-Id"] == live.run_id
    assert got.body == live.body
    assert outcomes(sc) == {"ok": 1.0}
    assert sc.metric(P + "replay_events_total") == len(events)
    assert sc.metric(P + "replay_active") == 0
    # Nothing came live: the whole run was catch-up.
    assert sc.metric(P + "replay_delivery_lag_seconds_count") == 0


async def test_every_cursor_gives_exactly_the_suffix(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    steps = [token("a"), token("b"), token("c"), stop("end_turn"), DONE]
    live = await finished_run(upstream, http, sc, steps)
    events = check_whole(live.body)
    n = len(events)
    sent = 0
    for cursor in range(n):
        by_query = await replay(http, sc, live.run_id, params={"starting_after": str(cursor)})
        by_header = await replay(http, sc, live.run_id, headers={"Last-Event-ID": str(cursor)})
        for got in (by_query, by_header):
            assert (got.status, got.body) == (200, b"".join(events[cursor:])), cursor
        sent += 2 * (n - cursor)
    # A finished run with nothing after the cursor: 204, which stops EventSource reconnecting.
    for cursor in (n, n + 1, 10**17):
        got = await replay(http, sc, live.run_id, headers={"Last-Event-ID": str(cursor)})
        assert (got.status, got.body) == (204, b""), cursor
    assert outcomes(sc) == {"ok": 2.0 * n, "no_content": 3.0}
    assert sc.metric(P + "replay_events_total") == sent


async def test_last_event_id_beats_starting_after(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    live = await finished_run(upstream, http, sc, RUNS["normal"])
    events = check_whole(live.body)
    r = live.run_id
    got = await replay(http, sc, r, headers={"Last-Event-ID": "3"}, params={"starting_after": "1"})
    assert (got.status, got.body) == (200, events[3])
    # The POST forms too: the header wins over the body.
    for path in (stream_path(r), f"/v1/runs/{r}/stream"):
        got = await stream(
            http, sc.url + path, headers={"Last-Event-ID": "2"}, json={"starting_after": 0}
        )
        assert (got.status, got.body) == (200, b"".join(events[2:]))
    # A bad header loses even next to a good query: the header is the cursor.
    got = await replay(http, sc, r, headers={"Last-Event-ID": "x"}, params={"starting_after": "1"})
    assert got.status == 400
    assert error_body(got)["type"] == "bad_cursor"
    assert outcomes(sc) == {"ok": 3.0, "bad_request": 1.0}


@pytest.mark.parametrize("route", ["/sidecar/v1/runs/{}/stream", "/v1/runs/{}/stream"])
@pytest.mark.parametrize("batch_size", [1, 3])
async def test_post_forms_page_through_the_same_bytes(
    route: str,
    batch_size: int,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    steps = [token(c) for c in "abcde"] + [stop("end_turn"), DONE]
    live = await finished_run(upstream, http, sc, steps)
    events = check_whole(live.body)
    assert len(events) == 7  # pages of 3: 3 + 3 + 1; of 1: seven
    url = sc.url + route.format(live.run_id)
    whole = await stream(http, url, json={"batch_size": batch_size, "poll_interval": 0.5})
    assert (whole.status, whole.body) == (200, live.body)
    # From a cursor: 6 events, an exact multiple of 3 (the last page holds [DONE]).
    body = {"starting_after": 1, "batch_size": batch_size, "include_pings": False}
    tail = await stream(http, url, json=body)
    assert (tail.status, tail.body) == (200, b"".join(events[1:]))
    empty_body = await stream(http, url, data=b"")  # no body at all: every default
    assert (empty_body.status, empty_body.body) == (200, live.body)
    by_get = await replay(http, sc, live.run_id, params={"batch_size": str(batch_size)})
    assert (by_get.status, by_get.body) == (200, live.body)
    assert outcomes(sc) == {"ok": 4.0}
    assert sc.metric(P + "replay_events_total") == 7 + 6 + 7 + 7


@pytest.mark.parametrize("batch_size", [2, 3, 100])
async def test_catch_up_pages_read_ahead_stop_at_a_hole(
    batch_size: int,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """Pages are read ahead on the guess that the run goes on whole; an entry gone from the
    middle (here deleted behind the sidecar's back) ends the catch-up right before it: nothing
    of the pages guessed past it is sent, and the reader is cut to resume."""
    sc = await make_sidecar()
    steps = [token(f"t{i}") for i in range(20)] + [stop("end_turn"), DONE]
    live = await finished_run(upstream, http, sc, steps)
    events = check_whole(live.body)
    assert len(events) == 22
    await redis_client.xdel(Keys().stream(live.run_id), "9-0")
    async with http.get(
        sc.url + stream_path(live.run_id), params={"batch_size": str(batch_size)}
    ) as resp:
        assert resp.status == 200
        reader = LiveReader(resp)
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.rest()
    assert reader.body == b"".join(events[:8])
    assert sc.metric(P + "replay_events_total") == 8
    # After the hole, the rest, whole.
    after = await replay(http, sc, live.run_id, params={"starting_after": "9", "batch_size": "2"})
    assert (after.status, after.body) == (200, b"".join(events[9:]))


# -- following a live run -------------------------------------------------------------------


async def test_a_reader_attached_mid_run_gets_history_then_live_events(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), gate, token("c"), stop("end_turn"), DONE])
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(2)
        await gate.reached.wait()
        await stored_count(redis_client, run_id, 2)
        async with http.get(sc.url + stream_path(run_id)) as resp:
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(2)
            assert reader.body == live.body  # the history, exactly
            assert sc.metric(P + "replay_active") == 1
            gate.open()
            body = await reader.rest()
        live_body = await live.rest()
    assert body == live_body
    assert len(check_whole(body)) == 5
    assert outcomes(sc) == {"ok": 1.0}
    assert sc.metric(P + "replay_active") == 0
    assert sc.metric(P + "replay_events_total") == 5
    # The three events after the gate came through the live tail, each with its lag observed.
    assert sc.metric(P + "replay_delivery_lag_seconds_count") == 3


async def test_a_reader_attached_before_the_first_event_gets_everything(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(heartbeat_seconds=0.2)
    gate = Gate()
    upstream.sse(PATH, [gate, token("a"), token("b"), stop("end_turn"), DONE])
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        await gate.reached.wait()

        async def claimed() -> bool:
            return bool(await meta(redis_client, run_id))

        await eventually(claimed, what="the run's claim in Redis")
        # The run exists (its meta says running) but has no event yet.
        assert await stored(redis_client, run_id) == []
        m = await meta(redis_client, run_id)
        assert (m["status"], m["last_seq"]) == ("running", "0")
        async with http.get(sc.url + stream_path(run_id)) as resp:
            assert resp.status == 200
            reader = LiveReader(resp)
            # A heartbeat proves the reader is past catch-up and waiting on the live tail.
            await read_until_bytes(reader, PING)
            gate.open()
            body = await reader.rest()
        live_body = await LiveReader(live_resp).rest()
    assert body.replace(PING, b"") == live_body
    assert len(check_whole(live_body)) == 4
    assert sc.metric(P + "replay_delivery_lag_seconds_count") == 4
    assert outcomes(sc) == {"ok": 1.0}


async def test_fifty_concurrent_readers_of_a_live_run_get_identical_bodies(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), token("c"), stop("end_turn"), DONE])
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(1)
        await gate.reached.wait()
        await stored_count(redis_client, run_id, 1)

        async def attach() -> LiveReader:
            resp = await http.get(sc.url + stream_path(run_id))
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(1)
            return reader

        readers = await asyncio.gather(*(attach() for _ in range(50)))
        try:
            assert sc.metric(P + "replay_active") == 50
            gate.open()
            bodies = await asyncio.gather(*(r.rest() for r in readers))
        finally:
            for r in readers:
                r.resp.release()
        live_body = await live.rest()
    assert len(check_whole(live_body)) == 5
    assert set(bodies) == {live_body}
    assert outcomes(sc) == {"ok": 50.0}
    assert sc.metric(P + "replay_active") == 0
    assert sc.metric(P + "replay_events_total") == 50 * 5
    assert sc.metric(P + "replay_delivery_lag_seconds_count") == 50 * 4


def _is_letta_ping(raw: bytes, run_id: str) -> bool:
    """A LettaPing event: no ``id:`` line (not numbered), the fields the Letta SDK requires."""
    if not raw.startswith(b"data: {") or b"\nid:" in raw:
        return False
    payload = json.loads(raw[len(b"data: ") :])
    return (
        payload["message_type"] == "ping"
        and payload["id"].startswith("ping-")
        and payload["run_id"] == run_id
        and bool(payload["date"])
    )


@pytest.mark.parametrize(
    ("method", "query", "body", "letta_pings"),
    [
        ("GET", {}, None, False),
        ("GET", {"include_pings": "true"}, None, True),
        ("POST", {}, {"include_pings": True}, True),
        ("POST", {}, {"include_pings": False}, False),
        ("POST", {}, {}, True),  # Letta's default
    ],
)
async def test_heartbeats_while_the_upstream_is_held(
    method: str,
    query: dict[str, str],
    body: dict[str, Any] | None,
    letta_pings: bool,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(heartbeat_seconds=0.2)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    marker = b'"message_type":"ping"' if letta_pings else PING
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(1)
        await gate.reached.wait()
        await stored_count(redis_client, run_id, 1)
        url = sc.url + stream_path(run_id)
        async with http.request(method, url, params=query, json=body) as resp:
            assert resp.status == 200
            reader = LiveReader(resp)
            await reader.until(1)
            await read_until_bytes(reader, marker, count=2)
            gate.open()
            replayed = await reader.rest()
        # The live client heard keep-alives of its own while the upstream was held (comments:
        # not events, not stored).
        live_body = (await live.rest()).replace(KEEPALIVE, b"")
        assert replayed.startswith(live_body[: live_body.index(b"\n\n") + 2])
    # Between events, never inside one: the history and the live events, with only heartbeats
    # in between.
    if letta_pings:
        events = split_events(replayed)
        pings = [e for e in events if _is_letta_ping(e, run_id)]
        assert PING not in replayed
        assert len(pings) >= 2
        assert b"".join(e for e in events if e not in pings) == live_body
    else:
        # A comment heartbeat is one line: it follows an event's blank line (or starts the body).
        assert replayed.count(PING) >= 2
        for part in replayed.split(PING)[:-1]:
            assert part == b"" or part.endswith(b"\n\n"), part[-40:]
        events = split_events(replayed.replace(PING, b""))
        assert not any(_is_letta_ping(e, run_id) for e in events)
        assert b"".join(events) == live_body
    assert outcomes(sc) == {"ok": 1.0}


# -- refusals -------------------------------------------------------------------------------


async def test_unknown_run_is_404_and_creates_nothing(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    expected = {"type": "run_not_found", "message": "no run 'nope' (unknown or expired)"}
    for method, path in (
        ("GET", stream_path("nope")),
        ("POST", stream_path("nope")),
        ("POST", "/v1/runs/nope/stream"),
        ("GET", "/sidecar/v1/runs/nope"),
    ):
        view = await stream(http, sc.url + path, method=method)
        assert view.status == 404, path
        assert error_body(view) == expected
    assert outcomes(sc) == {"not_found": 3.0}  # the status route is not a replay
    assert await redis_keys(redis_client) == []


async def test_a_cursor_older_than_the_first_retained_event_is_410(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(max_stream_events=5)
    steps = [token(c) for c in "abcdef"] + [stop("end_turn"), DONE]
    live = await finished_run(upstream, http, sc, steps)
    events = check_whole(live.body)
    assert len(events) == 8
    r = live.run_id
    assert [row["seq_id"] for row in await stored(redis_client, r)] == ["4", "5", "6", "7", "8"]
    for cursor in (0, 1, 2):
        got = await replay(http, sc, r, headers={"Last-Event-ID": str(cursor)})
        assert got.status == 410
        assert error_body(got) == {
            "type": "cursor_expired",
            "message": f"events after seq {cursor} are no longer retained",
            "first_available_seq": 4,
        }
    no_cursor = await replay(http, sc, r)
    assert no_cursor.status == 410
    assert error_body(no_cursor)["first_available_seq"] == 4
    posted = await stream(http, sc.url + f"/v1/runs/{r}/stream", json={"starting_after": 2})
    assert posted.status == 410
    assert error_body(posted)["type"] == "cursor_expired"
    # From the seq just before the first retained one on, nothing is missing.
    for cursor in (3, 7):
        got = await replay(http, sc, r, params={"starting_after": str(cursor)})
        assert (got.status, got.body) == (200, b"".join(events[cursor:]))
    assert (await replay(http, sc, r, params={"starting_after": "8"})).status == 204
    status = await stream(http, sc.url + f"/sidecar/v1/runs/{r}", method="GET")
    assert json.loads(status.body)["trimmed_events"] == 3
    assert outcomes(sc) == {"gone": 5.0, "ok": 2.0, "no_content": 1.0}
    assert sc.metric(P + "stream_trimmed_events_total") == 3


BAD_GET: list[tuple[dict[str, str], dict[str, str], str]] = [
    ({"starting_after": "-1"}, {}, "bad_cursor"),
    ({"starting_after": "abc"}, {}, "bad_cursor"),
    ({"starting_after": "1.5"}, {}, "bad_cursor"),
    ({"starting_after": "1e3"}, {}, "bad_cursor"),
    ({"starting_after": ""}, {}, "bad_cursor"),
    ({"starting_after": "\u0663"}, {}, "bad_cursor"),  # ARABIC-INDIC DIGIT THREE
    ({"starting_after": "9" * 19}, {}, "bad_cursor"),
    ({}, {"Last-Event-ID": "-1"}, "bad_cursor"),
    ({}, {"Last-Event-ID": "x"}, "bad_cursor"),
    ({}, {"Last-Event-ID": "0x10"}, "bad_cursor"),
    ({}, {"Last-Event-ID": "1" * 40}, "bad_cursor"),
    ({"batch_size": "0"}, {}, "bad_request"),
    ({"batch_size": "10001"}, {}, "bad_request"),
    ({"batch_size": "-3"}, {}, "bad_cursor"),
    ({"batch_size": "many"}, {}, "bad_cursor"),
]


@pytest.mark.parametrize(("query", "headers", "type_"), BAD_GET)
async def test_bad_cursor_or_batch_size_is_400(
    query: dict[str, str],
    headers: dict[str, str],
    type_: str,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    live = await finished_run(upstream, http, sc, RUNS["normal"])
    got = await replay(http, sc, live.run_id, params=query, headers=headers)
    assert got.status == 400
    err = error_body(got)
    assert err["type"] == type_
    assert err["message"]
    assert outcomes(sc) == {"bad_request": 1.0}
    assert sc.metric(P + "replay_events_total") == 0


BAD_BODIES: list[bytes] = [
    b"{",
    b"not json",
    b"[]",
    b"null",
    b'"starting_after"',
    b'{"starting_after": -1}',
    b'{"starting_after": "5"}',
    b'{"starting_after": true}',
    b'{"starting_after": 1.5}',
    b'{"batch_size": 0}',
    b'{"batch_size": 10001}',
    b'{"batch_size": "3"}',
    b'{"include_pings": "true"}',
    b'{"include_pings": 1}',
    b'{"poll_interval": -1}',
    b'{"poll_interval": "fast"}',
]


@pytest.mark.parametrize("raw", BAD_BODIES)
async def test_bad_post_body_is_400(
    raw: bytes,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    live = await finished_run(upstream, http, sc, RUNS["normal"])
    for path in (stream_path(live.run_id), f"/v1/runs/{live.run_id}/stream"):
        got = await stream(
            http, sc.url + path, data=raw, headers={"Content-Type": "application/json"}
        )
        assert got.status == 400, (path, got.body)
        err = error_body(got)
        assert err["type"] == "bad_request"
        assert err["message"].startswith("invalid replay body")
    assert outcomes(sc) == {"bad_request": 2.0}


@pytest.mark.parametrize("running", [False, True], ids=["finished", "running"])
async def test_a_huge_starting_after_in_the_body_is_400(
    running: bool,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, stop("end_turn"), DONE])
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        await LiveReader(live_resp).until(1)
        if not running:
            gate.open()
            await LiveReader(live_resp).rest()
            await sc.flushed()
        try:
            got = await stream(
                http,
                sc.url + f"/v1/runs/{run_id}/stream",
                json={"starting_after": 10**20},
                timeout=aiohttp.ClientTimeout(total=1),
            )
        finally:
            gate.open()
    assert got.status == 400
    assert error_body(got)["type"] == "bad_request"
    assert outcomes(sc) == {"bad_request": 1.0}


@pytest.mark.parametrize(
    "raw_id", ["has%20space", "x" * 129, "%C3%A9t%C3%A9", "run%0Aid", "a%2Ab", "a%25b", "a,b"]
)
async def test_an_invalid_run_id_is_400_before_any_key_is_touched(
    raw_id: str,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    for method, path in (
        ("GET", f"/sidecar/v1/runs/{raw_id}/stream"),
        ("POST", f"/sidecar/v1/runs/{raw_id}/stream"),
        ("POST", f"/v1/runs/{raw_id}/stream"),
        ("GET", f"/sidecar/v1/runs/{raw_id}"),
    ):
        view = await stream(http, sc.url + path, method=method)
        assert view.status == 400, path
        assert error_body(view)["type"] == "invalid_run_id"
    assert outcomes(sc) == {"bad_request": 3.0}
    assert await redis_keys(redis_client) == []


async def test_events_lost_by_the_writer_are_reported_not_skipped(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # One small event fits the writer's bound; the next is larger than the bound on its own, so
    # it is dropped (the live client still gets it); the run is stored again after it.
    sc = await make_sidecar(writer_max_bytes=500, heartbeat_seconds=0.2)
    live = await finished_run(
        upstream, http, sc, [token("a"), token("x" * 1000), stop("end_turn"), DONE]
    )
    events = check_whole(live.body)
    assert len(events) == 4
    r = live.run_id
    rows = await stored(redis_client, r)
    assert [int(row["seq_id"]) for row in rows] == [1, 3, 4]
    assert [row["data"].encode() for row in rows] == [events[0], events[2], events[3]]
    m = await meta(redis_client, r)
    assert (m["status"], m["last_seq"], m["incomplete"]) == ("completed", "4", "overflow")
    assert (m["lost_ranges"], m["lost_events"]) == ("2-2", "1")
    assert sc.metric(P + "writer_dropped_events_total", reason="overflow") == 1
    lost = {
        "lost_from": 2,
        "lost_to": 2,
        "resume_after": 2,
    }
    message = (
        "events 2-2 of this run were not stored (the writer's backlog was over its bound); "
        "resume after seq 2"
    )
    # A cursor right before the hole: 410 with the range and where to resume.
    got = await replay(http, sc, r, headers={"Last-Event-ID": "1"})
    assert got.status == 410
    assert error_body(got) == {"type": "events_lost", "message": message, **lost}
    # From 0: what was stored before the hole, then an explicit error event instead of a
    # silent skip, and the stream is cut (its reconnect gets the 410 above).
    with pytest.raises(aiohttp.ClientPayloadError):
        await replay(http, sc, r, timeout=aiohttp.ClientTimeout(total=5))
    async with http.get(sc.url + stream_path(r)) as resp:
        reader = LiveReader(resp)
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.rest()
    error_event: dict[str, object] = {"message_type": "error_message"}
    error_event |= {"error_type": "events_lost", "message": message, **lost}
    wire = json.dumps(error_event, separators=(",", ":"))
    assert reader.body == events[0] + f"event: error\ndata: {wire}\n\n".encode()
    # After the hole, the replay works.
    after = await replay(http, sc, r, headers={"Last-Event-ID": "2"})
    assert after.status == 200
    assert after.body == events[2] + events[3]
    status = await stream(http, sc.url + f"/sidecar/v1/runs/{r}", method="GET")
    body = json.loads(status.body)
    assert (body["incomplete"], body["lost_ranges"]) == ("overflow", [[2, 2]])
    assert outcomes(sc) == {"lost": 3.0, "ok": 3.0}


async def test_a_redis_outage_is_503_unavailable(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    sc = await make_sidecar(redis_url=dead, redis_timeout_seconds=0.5)
    for method, path in (("GET", stream_path("r1")), ("POST", "/v1/runs/r1/stream")):
        view = await stream(http, sc.url + path, method=method)
        assert view.status == 503
        assert error_body(view)["type"] == "redis_unavailable"
    status = await stream(http, sc.url + "/sidecar/v1/runs/r1", method="GET")
    assert status.status == 503
    assert outcomes(sc) == {"unavailable": 2.0}
    assert sc.metric(P + "redis_errors_total", operation="replay") == 2
    assert sc.metric(P + "redis_errors_total", operation="api") == 1


async def test_a_cursor_past_the_end_of_a_running_run_does_not_hang_forever(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(heartbeat_seconds=0.2)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, stop("end_turn"), DONE])
    async with streaming_run(http, sc, redis_client) as (run_id, live):
        url = sc.url + stream_path(run_id)
        try:
            async with http.get(url, headers={"Last-Event-ID": "50"}) as resp:
                if resp.status != 200:
                    assert resp.status == 400  # refusing the cursor up front is fine too
                    return
                reader = LiveReader(resp)
                await read_until_bytes(reader, PING)
                gate.open()
                await live.rest()
                # The run is over (last seq 3 < 50): nothing can ever come for this reader,
                # which should be told so within a few heartbeats.
                try:
                    body = await reader.rest(timeout=1.5)
                except TimeoutError:
                    pytest.fail("the reader is still open 1.5 s after the run ended")
                assert body.replace(PING, b"") == b""
        finally:
            gate.open()


async def test_a_reader_is_let_go_when_redis_fails_under_it(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    restartable_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(
        redis_url=restartable_redis.url, heartbeat_seconds=0.2, redis_timeout_seconds=0.5
    )
    client = redis.asyncio.Redis.from_url(restartable_redis.url)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, stop("end_turn"), DONE])
    try:
        async with streaming_run(http, sc, client) as (run_id, live):
            async with http.get(sc.url + stream_path(run_id)) as resp:
                reader = LiveReader(resp)
                await read_until_bytes(reader, PING)
                restartable_redis.stop()
                # Cut (an unterminated body, so that the client reconnects with
                # Last-Event-ID), or still alive (heartbeats go on until Redis is back): either,
                # but not silence. Heartbeats come every 0.2 s; the first one after the stop may
                # predate the failure.
                pings = 0
                try:
                    async with asyncio.timeout(2):
                        while pings < 4 and (chunk := await resp.content.readany()):
                            pings += chunk.count(PING)
                except TimeoutError:
                    pytest.fail(f"{pings} heartbeats and no end within 2 s of the Redis outage")
                except aiohttp.ClientPayloadError:
                    pass  # cut: the reader resumes elsewhere
            restartable_redis.start()
            gate.open()
            await live.rest()
    finally:
        gate.open()
        if restartable_redis.proc is None:
            restartable_redis.start()
        await client.aclose()
    assert "unavailable" not in outcomes(sc) or "ok" not in outcomes(sc)


async def test_readers_of_the_teeing_sidecar_are_served_by_its_writer_not_by_redis_reads(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    """What the sidecar's writer stored reaches the run's readers in that process from the
    writer itself: the blocked XREAD of the live tail leaves the run out (at most the one read
    in flight when the reader joined completes). Events are stored one at a time here: read
    back, each would take an XREAD of its own."""
    sc = await make_sidecar(heartbeat_seconds=0.2)
    gates = [Gate() for _ in range(20)]
    steps: list[Step] = [token("a")]
    for i, gate in enumerate(gates):
        steps += [gate, token(f"t{i}")]
    upstream.sse(PATH, [*steps, stop("end_turn"), DONE])

    async def xread_calls() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_xread", {}).get("calls", 0))

    async with (
        streaming_run(http, sc, redis_client) as (run_id, live),
        http.get(sc.url + stream_path(run_id)) as resp,
    ):
        reader = LiveReader(resp)
        await read_until_bytes(reader, PING)  # caught up on seq 1, following
        before = await xread_calls()
        for i, gate in enumerate(gates):
            gate.open()
            await reader.until(i + 2)  # stored, and handed to the reader, one by one
        live_body = await live.rest()
        body = (await reader.rest(timeout=5)).replace(PING, b"")
    events = check_whole(live_body)
    assert len(events) == 23
    assert split_events(body) == events
    assert await xread_calls() - before <= 1  # one per stored event when read back


async def test_a_live_reader_outrun_by_trimming_gets_an_error_not_a_hole(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(max_stream_events=5, heartbeat_seconds=0.2)
    # A replica on the same Redis: its readers follow the run by reading Redis, where the
    # trimmed events are gone; the teeing sidecar's own readers get them from its writer.
    replica = await make_sidecar(max_stream_events=5, heartbeat_seconds=0.2)
    gate = Gate()
    # 21 events in one upstream write: one writer round trip appends them all and trims to 5.
    burst = b"".join(token(f"t{i}") for i in range(19)) + stop("end_turn") + DONE
    upstream.sse(PATH, [token("a"), gate, burst])
    async with (
        streaming_run(http, sc, redis_client) as (run_id, live),
        http.get(replica.url + stream_path(run_id)) as resp,
        http.get(sc.url + stream_path(run_id)) as own_resp,
    ):
        reader, own = LiveReader(resp), LiveReader(own_resp)
        # Both following the live tail from seq 1.
        await read_until_bytes(reader, PING)
        await read_until_bytes(own, PING)
        gate.open()
        live_body = await live.rest()
        # The replica's reader is cut (an unterminated body) rather than handed a hole.
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.rest(timeout=3)
        body = reader.body.replace(PING, b"")
        own_body = (await own.rest(timeout=3)).replace(PING, b"")
    events = check_whole(live_body)
    assert len(events) == 22
    assert sc.metric(P + "stream_trimmed_events_total") == 17
    assert body == events[0]  # seq 1 only: seq 2..17 were trimmed before it could read them
    assert replica.metric(P + "replay_requests_total", outcome="slow_reader") == 1
    assert split_events(own_body) == events  # every event, as the live client got them
    # Its reconnect is told where history starts now.
    again = await replay(http, sc, run_id, headers={"Last-Event-ID": "1"})
    assert again.status == 410
    assert error_body(again)["first_available_seq"] == 18


# -- status ---------------------------------------------------------------------------------


async def test_status_of_a_running_then_finished_run(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    async with streaming_run(http, sc, redis_client) as (run_id, live):
        async with http.get(f"{sc.url}/sidecar/v1/runs/{run_id}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/json")
            running = await resp.json()
        gate.open()
        await live.rest()
    await sc.flushed()
    now_ms = int(time.time() * 1000)
    created = running["created_ms"]
    assert isinstance(created, int)
    assert created <= running["updated_ms"] <= now_ms
    assert running == {
        "run_id": run_id,
        "status": "running",
        "stop_reason": None,
        "error": None,
        "last_seq": 1,
        "created_ms": created,
        "updated_ms": running["updated_ms"],
        "finished_ms": None,
        "forced_done": None,
        "incomplete": None,
        "trimmed_events": 0,
        "lost_ranges": [],
        "history_lost_through": None,
        "history_lost_ranges": [],
        "dialect": "letta",
        "protocol_id": None,
    }
    async with http.get(f"{sc.url}/sidecar/v1/runs/{run_id}") as resp:
        done = await resp.json()
    assert created <= done["finished_ms"] <= done["updated_ms"] <= int(time.time() * 1000)
    assert done == {
        **running,
        "status": "completed",
        "stop_reason": "end_turn",
        "last_seq": 4,
        "updated_ms": done["updated_ms"],
        "finished_ms": done["finished_ms"],
    }
    assert outcomes(sc) == {}


async def test_status_of_a_failed_run_carries_its_error(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    incomplete = await finished_run(upstream, http, sc, RUNS["stream_incomplete"])
    async with http.get(f"{sc.url}/sidecar/v1/runs/{incomplete.run_id}") as resp:
        body = await resp.json()
    assert (body["status"], body["stop_reason"], body["forced_done"], body["last_seq"]) == (
        "failed",
        "error",
        "stream_incomplete",
        5,
    )
    assert body["error"] == {
        "message_type": "error_message",
        "error_type": "stream_incomplete",
        "message": "the upstream closed the stream without a stop reason, an error or [DONE]",
        "detail": None,
    }
    errored = await finished_run(upstream, http, sc, RUNS["error_then_done"])
    async with http.get(f"{sc.url}/sidecar/v1/runs/{errored.run_id}") as resp:
        body = await resp.json()
    assert (body["status"], body["stop_reason"], body["forced_done"], body["last_seq"]) == (
        "failed",
        "llm_api_error",
        None,
        4,
    )
    up_error = {"message_type": "error_message", "error_type": "llm_error", "message": "overloaded"}
    assert {k: body["error"][k] for k in up_error} == up_error


# -- producer lost --------------------------------------------------------------------------


async def test_the_sweep_ends_a_run_whose_producer_is_gone_without_any_reader(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(lease_seconds=0.3)
    r = RunId("orphan-1")
    history = await write_orphan(redis_client, r, 2, int(time.time() * 1000) - 1000)

    async def swept() -> bool:
        return (await meta(redis_client, r))["status"] != "running"

    # Nobody reads it, nobody asks for its status: the sweep alone ends it.
    await eventually(swept, what="the orphan sweep ending the run")
    async with http.get(f"{sc.url}/sidecar/v1/runs/{r}") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert (body["status"], body["stop_reason"], body["forced_done"], body["last_seq"]) == (
        "failed",
        "error",
        "producer_lost",
        5,
    )
    assert body["error"] == {
        "message_type": "error_message",
        "error_type": "producer_lost",
        "message": PRODUCER_LOST_MESSAGE,
        "detail": None,
    }
    assert isinstance(body["finished_ms"], int)
    rows = await stored(redis_client, r)
    assert "".join(row["data"] for row in rows).encode() == history + producer_lost_tail(3, r)
    assert [row["complete"] for row in rows] == ["false"] * 4 + ["true"]
    assert [row["id"] for row in rows] == [f"{i}-0" for i in range(1, 6)]
    m = await meta(redis_client, r)
    # The finalizer fenced the dead producer: it can never append after the terminal.
    assert m["producer"] != "gone-host:4242:0123456789ab"
    assert m["lease_until_ms"] == "0"
    assert sc.metric(P + "forced_done_total", reason="producer_lost") == 1
    assert sc.metric(P + "runs_finished_total", status="failed", stop_reason="error") == 1
    assert sc.metric(P + "run_duration_seconds_count", status="failed") == 1
    # The ended run left the lease index; the next passes change nothing.
    assert await redis_client.zscore("sse:run:leases", r) is None
    replayed = await replay(http, sc, r)
    assert replayed.body == history + producer_lost_tail(3, r)
    assert sc.metric(P + "forced_done_total", reason="producer_lost") == 1


async def test_a_run_whose_producer_holds_its_lease_is_left_alone(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(lease_seconds=0.3)
    r = RunId("alive-1")
    # Its index entry says expired, but Redis' own lease (the truth) is live for a minute.
    await write_orphan(redis_client, r, 2, int(time.time() * 1000) + 60_000, indexed_ms=1)

    async def passes() -> bool:
        return await redis_client.zscore("sse:run:leases", r) is not None

    for _ in range(5):  # a few sweep passes (every lease / 3)
        await asyncio.sleep(0.1)  # letting the sweep run: there is no event to await
    assert await passes()
    async with http.get(f"{sc.url}/sidecar/v1/runs/{r}") as resp:
        body = await resp.json()
    assert (body["status"], body["last_seq"], body["forced_done"]) == ("running", 2, None)
    assert len(await stored(redis_client, r)) == 2
    assert forced_total([sc], "producer_lost") == 0


async def test_racing_sweeps_end_a_dead_run_exactly_once_and_readers_get_its_end(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    # Alive when the readers attach; nobody renews the lease, so it runs out under them.
    r = RunId("orphan-race")
    history = await write_orphan(redis_client, r, 3, int(time.time() * 1000) + 400)
    sidecars = [await make_sidecar(heartbeat_seconds=0.1, lease_seconds=0.3) for _ in range(3)]
    responses = [await http.get(sc.url + stream_path(r)) for sc in sidecars for _ in range(5)]
    try:
        readers = [LiveReader(resp) for resp in responses]
        assert {resp.status for resp in responses} == {200}
        await asyncio.gather(*(reader.until(3) for reader in readers))
        bodies = await asyncio.gather(*(reader.rest(timeout=5) for reader in readers))
    finally:
        for resp in responses:
            resp.release()
    expected = history + producer_lost_tail(4, r)
    assert {body.replace(PING, b"") for body in bodies} == {expected}
    assert len(check_whole(expected)) == 6
    rows = await stored(redis_client, r)
    assert [row["seq_id"] for row in rows] == [str(i) for i in range(1, 7)]
    assert forced_total(sidecars, "producer_lost") == 1
    finished = sum(
        sc.metric(P + "runs_finished_total", status="failed", stop_reason="error")
        for sc in sidecars
    )
    assert finished == 1
    assert sum(outcomes(sc).get("ok", 0) for sc in sidecars) == 15


async def test_the_sweep_waits_until_redis_has_answered_for_a_whole_lease(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(lease_seconds=0.6)
    r = RunId("orphan-after-outage")
    await write_orphan(redis_client, r, 1, int(time.time() * 1000) - 1000)
    # As if Redis had just come back: a lease that lapsed during an outage says nothing about
    # its producer, which gets a whole lease to renew it.
    store = sc.app[STORE]
    store.health.failed(StoreUnavailable("test", "as if Redis had been away"))
    began = time.monotonic()

    async def swept() -> bool:
        return (await meta(redis_client, r))["status"] != "running"

    await eventually(swept, what="the sweep, one lease after Redis answered again")
    assert time.monotonic() - began >= 0.6
    assert sc.metric(P + "forced_done_total", reason="producer_lost") == 1


@pytest.fixture
async def killable() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_killed_producer_process_is_ended_once_by_the_sweeps(
    killable: list[asyncio.subprocess.Process],
    upstream: Upstream,
    redis_server: RedisServer,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    log = tmp_path / "producer.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sidecar", "serve", "--upstream-url", upstream.url),
            *("--redis-url", redis_server.url, "--host", "127.0.0.1", "--port", str(port)),
            *("--admin-port", str(admin), "--lease-seconds", "0.3", "--log-format", "text"),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    killable.append(proc)
    producer = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        assert proc.returncode is None, log.read_text()
        try:
            async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(ready, timeout=20, interval=0.05, what="the producer's /readyz")
    readers_side = [await make_sidecar(heartbeat_seconds=0.1, lease_seconds=0.3) for _ in range(2)]
    gate = Gate()
    upstream.sse(PATH, [token("a"), token("b"), gate, token("never"), DONE])
    async with http.post(producer + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(2)
        await stored_count(redis_client, run_id, 2)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await live.rest()
    gate.open()

    async def read(sc: Sidecar) -> bytes:
        view = await replay(http, sc, run_id, timeout=aiohttp.ClientTimeout(total=10))
        assert view.status == 200
        return view.body.replace(PING, b"")

    bodies = await asyncio.gather(*(read(sc) for sc in readers_side for _ in range(10)))
    assert len(set(bodies)) == 1
    events = check_whole(bodies[0])
    assert b"".join(events[:2]) == live.body
    assert events[2:] == split_events(producer_lost_tail(3, run_id))
    assert forced_total(readers_side, "producer_lost") == 1
    m = await meta(redis_client, run_id)
    assert (m["status"], m["forced_done"], m["last_seq"]) == ("failed", "producer_lost", "5")


# -- a slow reader --------------------------------------------------------------------------


def send_buffer_max() -> int:
    """The largest a TCP send buffer may grow to (Linux autotuning), or a usual 4 MiB."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


def small_receive_window(addr_info: Any) -> socket.socket:
    """A client socket whose kernel receive buffer is tiny and fixed (no autotuning)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_slow_reader_is_cut_loose_and_resumes_without_gaps_or_duplicates(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(replay_buffer_bytes=256 << 10)
    # Events of 32 KiB, one per gate, until well past what the buffers between the sidecar and
    # the stalled client can hold: the sidecar's send buffer (autotuned up to tcp_wmem's max),
    # the client's fixed 8 KiB receive window and aiohttp's read buffer.
    big = (send_buffer_max() + (2 << 20)) // (32 << 10)
    gates = [Gate() for _ in range(big)]
    steps: list[Step] = [token("start")]
    for i, gate in enumerate(gates):
        steps += [gate, token(f"{i:04d}" + "x" * (32 << 10))]
    upstream.sse(PATH, [*steps, stop("end_turn"), DONE])
    connector = aiohttp.TCPConnector(socket_factory=small_receive_window)
    async with (
        aiohttp.ClientSession(connector=connector) as slow_session,
        http.post(sc.url + PATH, json={}) as live_resp,
    ):
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        live = LiveReader(live_resp)
        await live.until(1)
        await stored_count(redis_client, run_id, 1)
        url = sc.url + stream_path(run_id)
        async with slow_session.get(url) as slow_resp, http.get(url) as fast_resp:
            slow = LiveReader(slow_resp)
            fast = LiveReader(fast_resp)
            await slow.until(1)
            await fast.until(1)
            # The slow reader reads nothing more, while the run goes on; the fast reader,
            # served by the same live tail, shows each event was handed to both.
            for i, gate in enumerate(gates):
                gate.open()
                await live.until(i + 2)
                await fast.until(i + 2)
            live_body = await live.rest()
            assert await fast.rest() == live_body
            # Cut: an unterminated body, so that the client knows to resume.
            with pytest.raises(aiohttp.ClientPayloadError):
                await slow.rest()
            cut = slow.body
    events = check_whole(live_body)
    assert len(events) == big + 3
    # Disconnected part way, at an event boundary, with no [DONE].
    received = split_events(cut)
    assert 1 < len(received) < len(events)
    assert received == events[: len(received)]
    assert sc.metric(P + "replay_requests_total", outcome="slow_reader") == 1
    last_id = slow.events[-1].id
    assert last_id == str(len(received))
    resumed = await replay(http, sc, run_id, headers={"Last-Event-ID": last_id})
    assert resumed.status == 200
    assert cut + resumed.body == live_body
    assert outcomes(sc) == {"ok": 3.0, "slow_reader": 1.0}
    assert sc.metric(P + "replay_active") == 0


async def test_a_live_reader_of_a_generic_run_gets_its_empty_end_as_one_clean_chunked_body(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # A generic run that ends by a clean close is stored with an empty last entry. The follower
    # writes live deliveries to the reader's connection itself, as HTTP chunks: an empty chunk
    # there would be a premature end of the body, and a second terminator after it.
    sc = await make_sidecar(dialect="generic")
    gate, closing = Gate(), Gate()
    # The close comes on its own, after "b" reached the reader: the empty end entry is stored
    # and delivered alone.
    upstream.sse(PATH, [token("a"), gate, token("b"), closing])
    async with http.post(sc.url + PATH, json={}) as live_resp:
        run_id = RunId(live_resp.headers["X-Sidecar-Run-Id"])
        await LiveReader(live_resp).until(1)
        await stored_count(redis_client, run_id, 1)
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET {stream_path(run_id)} HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            raw = await reader.readuntil(b"id: 1\n")
            gate.open()
            raw += await reader.readuntil(b"id: 2\n")
        closing.open()
        async with asyncio.timeout(10):
            raw += await reader.read()  # to the server's close
        writer.close()
        assert await live_resp.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    # Chunk by chunk: sizes, data, and one terminator at the very end.
    chunks, rest = [], body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
    assert rest == b"\r\n", f"bytes after the chunked body's end: {rest!r}"
    assert [e for e in b"".join(chunks).split(b"\n\n") if e][-1].startswith(b"id: 2\n")
    rows = await stored(redis_client, run_id)
    assert [(r["seq_id"], r["data"], r["complete"]) for r in rows][2] == ("3", "", "true")
