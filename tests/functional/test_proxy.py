"""The reverse proxy: everything that is not a teed event stream passes through unchanged.

DESIGN.md, "The API": anything else is proxied to the upstream unchanged (method, path, query,
headers minus hop-by-hop, body, status). Real HTTP on both sides, real Redis.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from yarl import URL

from tests.conftest import Gate, SidecarFactory, Upstream, free_port
from tests.functional.helpers import DONE, read_events, redis_keys, stop, stream, token

BIG = 5 << 20  # 5 MiB


@dataclass
class Captured:
    """What the upstream saw, with repeats and raw encoding kept."""

    raw_path: str = ""
    method: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def capture_route(upstream: Upstream, path: str, response: web.Response) -> Captured:
    captured = Captured()

    async def handler(request: web.Request) -> web.StreamResponse:
        captured.raw_path = request.raw_path
        captured.method = request.method
        captured.headers = [(k.decode(), v.decode()) for k, v in request.raw_headers]
        captured.body = upstream.requests[-1].body
        return response

    upstream.raw(path, handler)
    return captured


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- requests reach the upstream unchanged --------------------------------------------------


async def test_method_path_query_body_and_end_to_end_headers_reach_the_upstream(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    captured = capture_route(upstream, "/v1/things/a b//x", web.json_response({"ok": True}))
    raw_path = "/v1/things/a%20b/%2Fx?q=a%26b&tag=x&tag=y&empty=&plus=1+2&utf=%C3%A9&flag"
    body = b'{"hello": "world", "bytes": "\\u00e9"}'
    async with http.patch(
        URL(sc.url + raw_path, encoded=True),
        data=body,
        headers=[
            ("Content-Type", "application/json; charset=utf-8"),
            ("Authorization", "Bearer secret-token"),
            ("X-Custom", "one"),
            ("X-Multi", "first"),
            ("X-Multi", "second"),
            ("Cookie", "a=1; b=2"),
            ("User-Agent", "test-agent/1.0"),
            ("Accept-Encoding", "gzip"),
        ],
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}
    assert captured.method == "PATCH"
    assert captured.raw_path == raw_path
    assert upstream.requests[0].path_qs == raw_path
    assert captured.body == body
    assert captured.get_all("Content-Type") == ["application/json; charset=utf-8"]
    assert captured.get_all("Authorization") == ["Bearer secret-token"]
    assert captured.get_all("X-Custom") == ["one"]
    assert captured.get_all("X-Multi") == ["first", "second"]
    assert captured.get_all("Cookie") == ["a=1; b=2"]
    assert captured.get_all("User-Agent") == ["test-agent/1.0"]
    assert captured.get_all("Accept-Encoding") == ["gzip"]
    assert captured.get_all("Content-Length") == [str(len(body))]
    assert captured.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert captured.get_all("Host") == [f"127.0.0.1:{upstream.port}"]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS"])
async def test_methods_pass_through(
    method: str, upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    upstream.json("/v1/echo", {"m": method})
    async with http.request(method, sc.url + "/v1/echo?x=1") as resp:
        assert resp.status == 200
        assert await resp.json() == {"m": method}
    assert [(r.method, r.path_qs) for r in upstream.requests] == [(method, "/v1/echo?x=1")]


async def test_hop_by_hop_request_headers_are_dropped(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    captured = capture_route(upstream, "/v1/hop", web.Response(text="ok"))
    async with http.post(
        sc.url + "/v1/hop",
        data=b"x",
        headers={
            "Connection": "keep-alive, X-Named-Hop, x-other-named",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "Proxy-Connection": "keep-alive",
            "X-Named-Hop": "drop me",
            "X-Other-Named": "drop me too",
            "X-Kept": "keep me",
        },
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
    names = {k.lower() for k, _ in captured.headers}
    for hop in (
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-named-hop",
        "x-other-named",
    ):
        assert hop not in names, hop
    for value in captured.get_all("Connection"):
        assert "named" not in value.lower()
    assert captured.get_all("X-Kept") == ["keep me"]


async def test_x_forwarded_for_is_appended_to(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    upstream.json("/v1/x", {})
    async with http.get(sc.url + "/v1/x", headers={"X-Forwarded-For": "10.1.2.3"}) as resp:
        assert resp.status == 200
    assert upstream.requests[0].headers["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"


# -- responses come back unchanged ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"ok": true}'),
        (201, b'{"id": "new"}'),
        (204, b""),
        (404, b'{"detail": "not found"}'),
        (500, b"Internal Server Error: kaboom"),
        (302, b""),
        (304, b""),
    ],
)
async def test_status_headers_and_body_pass_through(
    status: int,
    body: bytes,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    headers = {"X-Up": "yes", "Cache-Control": "private, max-age=7"}
    if status == 302:
        headers["Location"] = "/v1/elsewhere"
    resp_headers = list(headers.items())
    resp_headers += [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")]
    if body:
        resp_headers.append(("Content-Type", "application/x-test"))

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body or None, headers=resp_headers)

    upstream.raw("/v1/resource", handler)
    upstream.json("/v1/elsewhere", {"followed": True})
    async with http.post(sc.url + "/v1/resource", allow_redirects=False) as resp:
        assert resp.status == status
        assert await resp.read() == body
        assert resp.headers["X-Up"] == "yes"
        assert resp.headers["Cache-Control"] == "private, max-age=7"
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
        if body:
            assert resp.headers["Content-Type"] == "application/x-test"
            assert resp.headers["Content-Length"] == str(len(body))
        if status == 302:
            assert resp.headers["Location"] == "/v1/elsewhere"
        assert "X-Sidecar-Run-Id" not in resp.headers
    # The sidecar did not follow the redirect.
    assert [r.path_qs for r in upstream.requests] == ["/v1/resource"]


async def test_five_mib_binary_request_body_round_trips(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    payload = blob(BIG, 1)
    upstream.json("/v1/upload", {"ok": True})
    async with http.put(
        sc.url + "/v1/upload",
        data=payload,
        headers={"Content-Type": "application/octet-stream"},
    ) as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 1
    assert upstream.requests[0].body == payload


async def test_five_mib_binary_chunked_request_body_round_trips(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    payload = blob(BIG, 2)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 300_001):
            yield payload[i : i + 300_001]

    upstream.json("/v1/upload", {"ok": True})
    async with http.post(sc.url + "/v1/upload", data=chunks()) as resp:
        assert resp.status == 200
    assert upstream.requests[0].body == payload


async def test_five_mib_binary_response_body_round_trips(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    payload = blob(BIG, 3)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, content_type="application/octet-stream")

    upstream.raw("/v1/download", handler)
    async with http.get(sc.url + "/v1/download") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-Length"] == str(BIG)
        assert await resp.read() == payload


async def test_gzip_response_is_relayed_still_compressed(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    plain = json.dumps({"items": list(range(2000))}).encode()
    compressed = gzip.compress(plain)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    upstream.raw("/v1/list", handler)
    async with http.get(sc.url + "/v1/list", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(compressed))
        raw = await resp.read()
    assert raw == compressed
    assert gzip.decompress(raw) == plain
    assert upstream.requests[0].headers["Accept-Encoding"] == "gzip"


async def test_head_passes_through(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"hello world", headers={"X-Up": "1"})

    upstream.raw("/v1/thing", handler)
    async with http.head(sc.url + "/v1/thing") as resp:
        assert resp.status == 200
        assert resp.headers["X-Up"] == "1"
        assert resp.headers["Content-Length"] == "11"
        assert await resp.read() == b""
    assert [(r.method, r.path_qs) for r in upstream.requests] == [("HEAD", "/v1/thing")]


async def test_head_on_an_event_stream_is_not_teed(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=token("a") + DONE, content_type="text/event-stream")

    upstream.raw("/v1/stream", handler)
    async with http.head(sc.url + "/v1/stream") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "X-Sidecar-Run-Id" not in resp.headers
        assert await resp.read() == b""
    assert upstream.requests[0].method == "HEAD"
    assert await redis_keys(redis_client) == []
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 0


# -- not teed: error statuses and other content types ---------------------------------------


async def test_event_stream_with_error_status_is_passed_through_untouched(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    body = token("a") + stop("error") + DONE
    upstream.sse("/v1/stream", [body], status=500)
    view = await stream(http, sc.url + "/v1/stream")
    assert view.status == 500
    assert view.body == body  # no ids, no filled payloads: not a run
    assert "X-Sidecar-Run-Id" not in view.headers
    assert await redis_keys(redis_client) == []
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "text/event-streams"])
async def test_non_event_stream_content_type_is_passed_through_untouched(
    content_type: str,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    body = token("a") + DONE

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": content_type})

    upstream.raw("/v1/stream", handler)
    view = await stream(http, sc.url + "/v1/stream")
    assert view.status == 200
    assert view.body == body
    assert view.headers["Content-Type"] == content_type
    assert "X-Sidecar-Run-Id" not in view.headers
    assert await redis_keys(redis_client) == []
    assert sc.metric("sse_sidecar_runs_started_total", route="proxy") == 0


# -- request limits and upstream failures ---------------------------------------------------


def assert_json_error(status: int, body: bytes, expected_status: int, type_: str) -> str:
    assert status == expected_status
    doc = json.loads(body)
    assert set(doc) == {"error"}
    assert doc["error"]["type"] == type_
    message = doc["error"]["message"]
    assert isinstance(message, str)
    assert message
    return message


async def test_request_body_over_the_limit_with_content_length_is_413(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(max_request_bytes=1000)
    upstream.json("/v1/upload", {"ok": True})
    async with http.post(sc.url + "/v1/upload", data=b"x" * 1001) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        message = assert_json_error(resp.status, await resp.read(), 413, "request_too_large")
    assert message == "request body exceeds the limit of 1000 bytes"
    assert upstream.requests == []
    # Exactly at the limit is fine.
    async with http.post(sc.url + "/v1/upload", data=b"x" * 1000) as resp:
        assert resp.status == 200
    assert [r.body for r in upstream.requests] == [b"x" * 1000]


async def test_chunked_request_body_over_the_limit_is_413(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(max_request_bytes=1000)
    upstream.json("/v1/upload", {"ok": True})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 400

    async with http.post(sc.url + "/v1/upload", data=chunks()) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        message = assert_json_error(resp.status, await resp.read(), 413, "request_too_large")
    assert message == "request body exceeds the limit of 1000 bytes"
    # Whatever the upstream got of it, it never got the whole body.
    assert all(len(r.body) <= 1000 for r in upstream.requests)


async def test_unreachable_upstream_is_502(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(upstream_url=f"http://127.0.0.1:{free_port()}")
    async with http.post(sc.url + "/v1/anything", json={"a": 1}) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        message = assert_json_error(resp.status, await resp.read(), 502, "upstream_unreachable")
    assert message.startswith("cannot reach the upstream")


# -- streaming latency ----------------------------------------------------------------------


async def test_an_event_reaches_the_client_before_the_upstream_sends_the_next(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    first, second = Gate(), Gate()
    upstream.sse("/v1/stream", [token("a"), first, token("b"), second, stop("end_turn"), DONE])
    async with http.post(sc.url + "/v1/stream") as resp:
        run_id = resp.headers["X-Sidecar-Run-Id"]
        got = await asyncio.wait_for(read_events(resp, 1), 5)
        assert not first.event.is_set()
        assert got == (
            b'id: 1\ndata: {"message_type":"assistant_message","content":"a","seq_id":1,'
            b'"run_id":"' + run_id.encode() + b'"}\n\n'
        )
        first.open()
        got = await asyncio.wait_for(read_events(resp, 1), 5)
        assert not second.event.is_set()
        assert got.startswith(b"id: 2\n")
        second.open()
        rest = await resp.read()
    assert rest.endswith(b"id: 4\ndata: [DONE]\n\n")
    await sc.flushed()


async def test_a_streamed_non_sse_body_is_relayed_as_it_arrives(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    gate = Gate()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"part": 1}\n')
        gate.reached.set()
        await gate.event.wait()
        await resp.write(b'{"part": 2}\n')
        await resp.write_eof()
        return resp

    upstream.raw("/v1/ndjson", handler)
    async with http.get(sc.url + "/v1/ndjson") as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        got = await asyncio.wait_for(resp.content.readline(), 5)
        assert got == b'{"part": 1}\n'
        assert not gate.event.is_set()
        gate.open()
        assert await resp.read() == b'{"part": 2}\n'


async def test_hop_by_hop_response_headers_are_dropped(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="ok",
            headers={
                "Connection": "keep-alive, X-Resp-Hop",
                "Keep-Alive": "timeout=5",
                "X-Resp-Hop": "drop me",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "X-Resp-Kept": "keep me",
            },
        )

    upstream.raw("/v1/hop", handler)
    async with http.get(sc.url + "/v1/hop") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
        names = {k.lower() for k in resp.headers}
    for hop in ("keep-alive", "x-resp-hop", "proxy-authenticate", "trailer"):
        assert hop not in names, hop
    assert resp.headers["X-Resp-Kept"] == "keep me"


async def test_upstream_silent_before_its_headers_is_504(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar(upstream_read_timeout_seconds=0.3)
    gate = Gate()

    async def handler(request: web.Request) -> web.StreamResponse:
        gate.reached.set()
        await gate.event.wait()
        return web.Response(text="too late")

    upstream.raw("/v1/slow", handler)
    try:
        view = await stream(http, sc.url + "/v1/slow")
    finally:
        gate.open()
    assert view.headers["Content-Type"].startswith("application/json")
    assert_json_error(view.status, view.body, 504, "upstream_timeout")


@pytest.mark.parametrize("length", [100, None])
async def test_upstream_failing_mid_body_is_not_a_clean_end_for_the_client(
    length: int | None,
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Content-Length or chunked: the client must see a broken body, never a short clean one."""
    sc = await make_sidecar()
    gate = Gate()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        await resp.write(b"0123456789")
        gate.reached.set()
        await gate.event.wait()
        assert request.transport is not None
        request.transport.abort()
        return resp

    upstream.raw("/v1/broken", handler)
    async with http.get(sc.url + "/v1/broken") as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readexactly(10), 5) == b"0123456789"
        gate.open()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_event_stream_content_type_with_parameters_is_teed(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    body = token("a") + stop("end_turn") + DONE

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": "Text/Event-Stream; charset=utf-8"})

    upstream.raw("/v1/stream", handler)
    view = await stream(http, sc.url + "/v1/stream")
    assert view.status == 200
    assert view.headers["Content-Type"] == "Text/Event-Stream; charset=utf-8"
    assert "Content-Length" not in view.headers
    await sc.flushed()
    assert await redis_keys(redis_client) == [
        f"sse:run:{{{view.run_id}}}",
        f"sse:run:{{{view.run_id}}}:meta",
    ]
    assert [e.id for e in view.events] == ["1", "2", "3"]


async def test_event_stream_in_an_encoding_the_tee_cannot_read_is_refused_not_relayed_unstored(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    # The request asks for no brotli (see the next test); an upstream that sends it anyway
    # gets its stream refused: relaying it would leave a run nobody can replay.
    sc = await make_sidecar()
    body = b"\x0b\x1f\x80not-really-brotli\x03"

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body, headers={"Content-Type": "text/event-stream", "Content-Encoding": "br"}
        )

    upstream.raw("/v1/stream", handler)
    view = await stream(http, sc.url + "/v1/stream", headers={"Accept-Encoding": "br"})
    assert view.status == 502
    assert json.loads(view.body)["error"]["type"] == "unsupported_encoding"
    assert body not in view.body
    assert "X-Sidecar-Run-Id" not in view.headers
    assert upstream.requests[0].headers["Accept-Encoding"] == "identity"
    assert sc.metric("sse_sidecar_upstream_rejected_total", reason="unsupported_encoding") == 1
    assert await redis_keys(redis_client) == []


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("br, zstd", "identity"),
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("br;q=1.0, GZIP;q=0.5, *;q=0.1", "GZIP;q=0.5"),
        ("identity", "identity"),
        ("*", "identity"),
        ("x-gzip , deflate;q=0", "x-gzip, deflate;q=0"),
    ],
)
async def test_accept_encoding_asks_only_for_codings_the_tee_can_decode(
    upstream: Upstream,
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    sent: str,
    forwarded: str,
) -> None:
    # Whether a response is an event stream is known only when it comes: every request asks
    # for what the tee decodes, so that no event stream ever has to be relayed unstored.
    sc = await make_sidecar()
    upstream.json("/v1/list", {"ok": True})
    async with http.get(sc.url + "/v1/list", headers={"Accept-Encoding": sent}) as resp:
        assert resp.status == 200
    assert upstream.requests[0].headers["Accept-Encoding"] == forwarded


async def test_x_forwarded_for_keeps_every_prior_hop(
    upstream: Upstream, make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = await make_sidecar()
    upstream.json("/v1/x", {})
    headers = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2, 10.0.0.3")]
    async with http.get(sc.url + "/v1/x", headers=headers) as resp:
        assert resp.status == 200
    assert upstream.requests[0].headers["X-Forwarded-For"] == (
        "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"
    )
