"""Careless and hostile clients on the traffic port, over real sockets (issue 11, cases 4, 6, 7):
header bytes that are not text, connections left idle or half-sent, malformed requests, and
ambiguous run-id headers."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
import redis.asyncio

from tests.conftest import Sidecar, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    raw_connect,
    raw_exchange,
    raw_request,
    read_to_end,
    stop,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"
BAD = "sse_sidecar_bad_requests_total"


async def test_header_bytes_that_are_not_text_get_401_on_every_guarded_route(
    make_sidecar: SidecarFactory, redis_client: redis.asyncio.Redis
) -> None:
    sc = await make_sidecar(replay_token="s3cret", signing_key="k")
    routes = [
        ("GET", "/sidecar/v1/runs/r1/stream"),
        ("POST", "/sidecar/v1/runs/r1/stream"),
        ("POST", "/v1/runs/r1/stream"),
        ("GET", "/sidecar/v1/runs/r1"),
        ("POST", "/sidecar/v1/runs/r1/cancel"),
    ]
    for method, path in routes:
        for headers, query in (
            ([("Authorization", "Bearer \xff\xfe\xfd")], ""),
            ([("Authorization", "\xff\xfe \xfd")], ""),
            ([("Authorization", "Bearer s3cret\xff")], ""),
            ([], "?token=%FF%FE%FD"),
        ):
            status, body = await raw_exchange(
                sc.settings.port, raw_request(method, path + query, headers)
            )
            assert status == 401, (method, path, headers, query, body)
            assert json.loads(body)["error"]["type"] == "unauthorized"
    assert (
        sc.metric("sse_sidecar_http_requests_total", route="status", method="GET", code="500") == 0
    )


async def test_a_connection_that_sends_half_its_headers_gets_408_and_is_closed(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(request_header_timeout_seconds=0.3)
    reader, writer = await raw_connect(sc.settings.port)
    writer.write(b"GET /sidecar/v1/runs/r1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    try:
        raw, reset = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    assert not reset
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in head
    assert json.loads(body)["error"] == {
        "type": "request_timeout",
        "message": "request headers not received within 0.3s",
    }
    assert sc.metric(BAD, reason="header_timeout") == 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(request_header_timeout_seconds=0.3)
    reader, writer = await raw_connect(sc.settings.port)
    try:
        raw, _ = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert sc.metric(BAD, reason="header_timeout") == 1


async def test_the_header_deadline_restarts_with_each_request_on_a_kept_alive_connection(
    make_sidecar: SidecarFactory,
) -> None:
    # Several full requests on one connection, spread over more than the header timeout: each
    # request's headers come within it, so none is cut; then a half-sent one is.
    sc = await make_sidecar(request_header_timeout_seconds=0.5, keepalive_timeout_seconds=30)
    reader, writer = await raw_connect(sc.settings.port)
    try:
        for _ in range(3):
            writer.write(raw_request("GET", "/sidecar/v1/runs/nope"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404 ")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.3)  # idle between requests: the keep-alive timer's business
        writer.write(b"GET /sidecar/v1/runs/nope HTTP/1.1\r\n")
        raw, _ = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert sc.metric(BAD, reason="header_timeout") == 1


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(keepalive_timeout_seconds=0.3)
    reader, writer = await raw_connect(sc.settings.port)
    try:
        writer.write(raw_request("GET", "/sidecar/v1/runs/nope"))
        raw, reset = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert b"Connection: close" not in raw  # kept alive, then closed when idle
    assert not reset
    assert sc.metric(BAD, reason="header_timeout") == 0


@pytest.mark.parametrize(
    "path", ["/v1/agents/agent-1/messages", "/sidecar/v1/runs/r1/stream", "/v1/runs/r1/stream"]
)
async def test_a_request_body_that_stops_coming_gets_408(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    path: str,
) -> None:
    sc = await make_sidecar(request_body_idle_timeout_seconds=0.3)
    upstream.json(path, {"ok": True})
    reader, writer = await raw_connect(sc.settings.port)
    try:
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\nContent-Type: application/json"
            b'\r\nContent-Length: 100\r\n\r\n{"starting_'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"Connection: close" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert body["error"]["type"] == "request_timeout"
    assert "0.3s" in body["error"]["message"]
    assert sc.metric(BAD, reason="body_timeout") == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    ],
    ids=["no_http", "space_in_name", "nul_in_value", "long_line", "two_lengths", "bad_chunk", "v9"],
)
async def test_a_malformed_request_gets_a_json_400_and_one_quiet_log_line(
    make_sidecar: SidecarFactory,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
) -> None:
    sc = await make_sidecar()
    caplog.set_level(logging.DEBUG)
    reader, writer = await raw_connect(sc.settings.port)
    try:
        writer.write(request_bytes)
        raw, _ = await read_to_end(reader, timeout=5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"505"), raw
    assert json.loads(body)["error"]["type"] == "bad_request"
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == []
    mine = [r for r in caplog.records if r.name == "sidecar.server"]
    assert len(mine) == 1
    assert mine[0].levelno == logging.INFO
    assert sc.metric(BAD, reason="malformed") == 1


async def test_different_duplicate_run_id_headers_are_400_before_anything_is_proxied(
    upstream: Upstream, sidecar: Sidecar
) -> None:
    request = raw_request("POST", PATH, [("X-Run-Id", "run-a"), ("X-Run-Id", "run-b")], b"{}")
    status, body = await raw_exchange(sidecar.settings.port, request)
    assert status == 400
    assert json.loads(body) == {
        "error": {
            "type": "ambiguous_run_id",
            "message": "2 different X-Run-Id headers: send one run id",
        }
    }
    assert upstream.requests == []


async def test_identical_duplicate_run_id_headers_are_one_run_id(
    upstream: Upstream,
    sidecar: Sidecar,
    http: aiohttp.ClientSession,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    request = raw_request("POST", PATH, [("X-Run-Id", "same"), ("X-Run-Id", "same")], b"{}")
    status, _ = await raw_exchange(sidecar.settings.port, request)
    assert status == 200
    await sidecar.flushed()
    async with http.get(sidecar.url + "/sidecar/v1/runs/same") as resp:
        assert (await resp.json())["status"] == "completed"


async def test_a_json_number_with_a_zero_fraction_is_an_integer_in_a_replay_body(
    upstream: Upstream, sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    # JSON Schema (and so the OpenAPI document) calls 2.0 an integer; schemathesis found it
    # refused. 2.5 is not one, nor is "2".
    upstream.sse(PATH, [token("a"), token("b"), stop("end_turn"), DONE])
    request = raw_request("POST", PATH, [("X-Run-Id", "floats")], b"{}")
    assert (await raw_exchange(sidecar.settings.port, request))[0] == 200
    await sidecar.flushed()
    url = sidecar.url + "/v1/runs/floats/stream"
    async with http.post(url, json={"starting_after": 2.0, "batch_size": 1.0}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(b"id: 3\n")
    for bad in ({"starting_after": 2.5}, {"starting_after": "2"}, {"batch_size": 1e30}):
        async with http.post(url, json=bad) as resp:
            assert resp.status == 400, bad
