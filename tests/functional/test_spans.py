"""OpenTelemetry spans, trace-id log fields and metric exemplars (DESIGN.md "Telemetry").

A real sidecar, upstream and Redis, with an SDK tracer whose spans land in the SDK's in-memory
exporter: the server span of each request, the upstream client span (whose id the upstream gets
in ``traceparent``), ``sse.run`` with its attributes and span events, ``sse.flush`` (a root,
linked to the runs it carried), ``sse.replay``; the run meta's ``trace_id``; the forced-terminal
warning's ``trace_id``/``span_id``; and trace-id exemplars in the OpenMetrics exposition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, Tracer

from sidecar.keys import RunId
from sidecar.telemetry import JsonFormatter
from tests.conftest import Gate, RedisServer, SidecarFactory, Upstream
from tests.functional.helpers import (
    DONE,
    error,
    eventually,
    meta,
    read_events,
    stop,
    stream,
    token,
)

PATH = "/v1/agents/agent-1/messages/stream"
REPLAY_TEMPLATE = "/sidecar/v1/runs/{run_id}/stream"
OPENMETRICS = {"Accept": "application/openmetrics-text"}
# A W3C trace context as a caller would send it.
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
CALLER_TRACEPARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"
LATENCY_BUCKETS = (
    "sse_sidecar_http_request_duration_seconds_bucket",
    "sse_sidecar_run_duration_seconds_bucket",
    "sse_sidecar_upstream_first_event_seconds_bucket",
    "sse_sidecar_flush_duration_seconds_bucket",
)


class Spans(SpanProcessor):
    """An SDK tracer whose finished spans go to an in-memory exporter, with a wake-up per span
    end so tests can await a span instead of sleeping."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self)
        self.tracer: Tracer = self.provider.get_tracer("t")
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self._loop.call_soon_threadsafe(self._ended.set)

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name and (kind is None or s.kind == kind)]

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._ended.clear()
                if check():
                    return
                await self._ended.wait()

    async def one(self, name: str, kind: SpanKind | None = None) -> ReadableSpan:
        """Await the span called ``name`` (of ``kind``); fails if there is more than one."""
        await self.until(lambda: len(self.named(name, kind)) >= 1)
        found = self.named(name, kind)
        assert len(found) == 1, [s.name for s in found]
        return found[0]


@pytest.fixture
async def spans() -> AsyncIterator[Spans]:
    recorder = Spans()
    yield recorder
    recorder.provider.shutdown()


def ctx(span: ReadableSpan) -> SpanContext:
    c = span.context
    assert isinstance(c, SpanContext)
    return c


def ids(c: SpanContext) -> tuple[int, int]:
    return c.trace_id, c.span_id


def linked(span: ReadableSpan) -> list[tuple[int, int]]:
    """(trace id, span id) of each span ``span`` links to."""
    return [ids(link.context) for link in span.links]


def trace_hex(span: ReadableSpan) -> str:
    return f"{ctx(span).trace_id:032x}"


def span_hex(span: ReadableSpan) -> str:
    return f"{ctx(span).span_id:016x}"


def traceparent(span: ReadableSpan) -> str:
    """The W3C header naming ``span`` (flags: sampled, plus the SDK's random-trace-id bit)."""
    c = ctx(span)
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events]


def is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        child.parent is not None
        and child.parent.span_id == ctx(parent).span_id
        and ctx(child).trace_id == ctx(parent).trace_id
    )


async def teed_run(
    sc_url: str,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    steps: list[Any],
    **kwargs: Any,
) -> tuple[RunId, bytes]:
    upstream.sse(PATH, steps)
    view = await stream(http, sc_url + PATH, json={"messages": []}, **kwargs)
    assert view.status == 200
    return view.run_id, view.body


async def get_text(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


_EXEMPLAR = re.compile(
    r'^(?P<sample>[a-z_]+)\{[^}]*\} \S+ # \{trace_id="(?P<trace>[0-9a-f]{32})"\} \S+( \S+)?$'
)


def exemplars(exposition: str) -> dict[str, list[str]]:
    """Trace ids of the exemplars in an OpenMetrics exposition, by sample name."""
    out: dict[str, list[str]] = {}
    for line in exposition.splitlines():
        if " # {" not in line:
            continue
        m = _EXEMPLAR.match(line)
        assert m is not None, f"malformed exemplar line: {line!r}"
        out.setdefault(m["sample"], []).append(m["trace"])
    return out


# -- the spans of a teed run ----------------------------------------------------------------


async def test_a_natural_run_has_server_client_and_run_spans(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, body = await teed_run(
        sc.url, upstream, http, [token("Hel"), token("lo"), stop("end_turn"), DONE]
    )
    await sc.flushed()
    server = await spans.one("POST", SpanKind.SERVER)
    client = await spans.one("POST", SpanKind.CLIENT)
    run = await spans.one("sse.run")

    # The server span: the method only (a proxied path is unbounded, it has no route).
    assert server.parent is None
    assert attrs(server) == {
        "http.request.method": "POST",
        "url.path": PATH,
        "http.response.status_code": 200,
    }
    assert server.status.status_code is StatusCode.UNSET

    # The client span: a child of the server span, and what the upstream continued.
    assert is_child(client, server)
    assert attrs(client) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "http.response.status_code": 200,
    }
    assert upstream.requests[-1].headers["traceparent"] == traceparent(client)
    assert ctx(client).trace_flags.sampled

    # sse.run: a child of the server span, covering the tee after the upstream's headers.
    assert run.kind is SpanKind.INTERNAL
    assert is_child(run, server)
    assert client.end_time is not None
    assert run.start_time is not None
    assert client.end_time <= run.start_time
    assert attrs(run) == {
        "sse.run_id": run_id,
        "sse.dialect": "letta",
        "sse.status": "completed",
        "sse.stop_reason": "end_turn",
        "sse.events": 4,
        "sse.bytes": len(body),
        "sse.forced_done": "",
    }
    assert events(run) == [("saw_done", {"sse.seq": 4})]
    assert run.status.status_code is StatusCode.UNSET

    # The trace of the request holds exactly these three spans; the run meta names it.
    in_trace = sorted(s.name for s in spans.all() if ctx(s).trace_id == ctx(server).trace_id)
    assert in_trace == ["POST", "POST", "sse.run"]
    assert (await meta(redis_client, run_id))["trace_id"] == trace_hex(run)


async def test_flush_spans_are_roots_linked_to_the_runs_they_carried(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, _ = await teed_run(
        sc.url, upstream, http, [token("a"), token("b"), stop("end_turn"), DONE]
    )
    await sc.flushed()
    run = await spans.one("sse.run")
    flushes = spans.named("sse.flush")
    assert flushes
    for flush in flushes:
        assert flush.kind is SpanKind.CLIENT
        assert flush.parent is None
        assert trace_hex(flush) != trace_hex(run)
        a = attrs(flush)
        assert set(a) == {"sse.flush.events", "sse.flush.runs", "sse.flush.outcome"}
        assert a["sse.flush.outcome"] == "ok"
        assert a["sse.flush.runs"] == 1
        assert linked(flush) == [ids(ctx(run))]
        assert flush.status.status_code is StatusCode.UNSET
    # Every stored event travelled in exactly one flush; every round trip has its span.
    assert sum(attrs(f)["sse.flush.events"] for f in flushes) == 4
    assert sc.metric("sse_sidecar_flushes_total", outcome="ok") == len(flushes)
    assert sc.metric("sse_sidecar_flushes_total", outcome="error") == 0
    assert (await meta(redis_client, run_id))["last_seq"] == "4"


async def test_a_flush_carrying_two_runs_links_both_and_failed_flushes_are_errors(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    restartable_redis: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(
        tracer=spans.tracer, redis_url=restartable_redis.url, redis_timeout_seconds=0.5
    )
    restartable_redis.stop()
    # Both runs end while Redis is down: their events wait in the writer, together.
    first, _ = await teed_run(sc.url, upstream, http, [token("a"), stop("end_turn"), DONE])
    second, _ = await teed_run(sc.url, upstream, http, [token("b"), stop("end_turn"), DONE])
    await spans.until(lambda: len(spans.named("sse.run")) == 2)
    await spans.until(
        lambda: any(attrs(f)["sse.flush.runs"] == 2 for f in spans.named("sse.flush"))
    )
    restartable_redis.start()
    await sc.flushed(timeout=10)
    runs = {attrs(s)["sse.run_id"]: ids(ctx(s)) for s in spans.named("sse.run")}
    assert set(runs) == {first, second}
    flushes = spans.named("sse.flush")
    failed = [f for f in flushes if attrs(f)["sse.flush.outcome"] != "ok"]
    ok = [f for f in flushes if attrs(f)["sse.flush.outcome"] == "ok"]
    assert failed
    for flush in failed:
        assert flush.parent is None
        assert flush.status.status_code is StatusCode.ERROR
        # retry: Redis came back without the script; it is loaded and the round trip sent again.
        assert attrs(flush)["sse.flush.outcome"] in ("error", "retry")
        assert set(linked(flush)) <= set(runs.values())
        assert len(flush.links) == attrs(flush)["sse.flush.runs"]
    errors = [f for f in failed if attrs(f)["sse.flush.outcome"] == "error"]
    assert errors
    assert all("exception" in [e.name for e in f.events] for f in errors)
    # The round trip that wrote them once Redis was back carried both runs, linked to both.
    assert ok
    carried = ok[0]
    assert attrs(carried)["sse.flush.runs"] == 2
    assert attrs(carried)["sse.flush.events"] == 6
    assert sorted(linked(carried)) == sorted(runs.values())
    assert sc.metric("sse_sidecar_flushes_total", outcome="error") == len(failed)
    assert sc.metric("sse_sidecar_flushes_total", outcome="ok") == len(ok)


async def test_error_then_done_has_saw_error_saw_done_and_no_forced_done(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, body = await teed_run(sc.url, upstream, http, [token("a"), error(), DONE])
    await sc.flushed()
    run = await spans.one("sse.run")
    assert events(run) == [
        ("saw_error", {"sse.seq": 2}),
        ("saw_done", {"sse.seq": 3}),
        ("saw_done_after_error", {"sse.seq": 3}),
    ]
    assert attrs(run) == {
        "sse.run_id": run_id,
        "sse.dialect": "letta",
        "sse.status": "failed",
        "sse.stop_reason": "",
        "sse.events": 3,
        "sse.bytes": len(body),
        "sse.forced_done": "",
    }
    assert run.status.status_code is StatusCode.ERROR
    assert sc.metric("sse_sidecar_forced_done_total", reason="missing_done_after_error") == 0


async def test_stream_incomplete_has_forced_done_an_error_status_and_a_traced_warning(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar")
    # Formatted when emitted, in the emitting task's context, as the real handler does.
    caplog.handler.setFormatter(JsonFormatter())
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, body = await teed_run(sc.url, upstream, http, [token("a")])  # clean EOF, no [DONE]
    await sc.flushed()
    run = await spans.one("sse.run")
    assert events(run) == [("forced_done", {"sse.reason": "stream_incomplete", "sse.detail": ""})]
    assert attrs(run) == {
        "sse.run_id": run_id,
        "sse.dialect": "letta",
        "sse.status": "failed",
        "sse.stop_reason": "error",
        "sse.events": 4,  # a, then the synthesized stop_reason, error and [DONE]
        "sse.bytes": len(body),
        "sse.forced_done": "stream_incomplete",
    }
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "run failed"
    assert (await meta(redis_client, run_id))["trace_id"] == trace_hex(run)

    lines = [json.loads(line) for line in caplog.text.splitlines() if line]
    forced = [line for line in lines if line["message"].startswith("run ended without")]
    assert len(forced) == 1
    assert forced[0]["level"] == "warning"
    assert forced[0]["run_id"] == run_id
    assert forced[0]["reason"] == "stream_incomplete"
    assert forced[0]["trace_id"] == trace_hex(run)
    assert forced[0]["span_id"] == span_hex(run)


async def test_a_client_disconnect_is_a_span_event_of_the_run(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    resp = await http.post(sc.url + PATH, json={})
    run_id = RunId(resp.headers["X-Sidecar-Run-Id"])
    await read_events(resp, 1)
    await gate.reached.wait()
    resp.close()

    async def left() -> bool:
        return sc.metric("sse_sidecar_client_disconnects_total") == 1

    await eventually(left, what="the sidecar to notice the client left")
    gate.open()
    await sc.flushed()
    run = await spans.one("sse.run")
    assert events(run) == [("client_disconnected", {"sse.seq": 1}), ("saw_done", {"sse.seq": 4})]
    assert attrs(run)["sse.run_id"] == run_id
    assert attrs(run)["sse.status"] == "completed"
    assert attrs(run)["sse.events"] == 4


async def test_a_client_disconnect_is_not_recorded_as_a_server_error(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, stop("end_turn"), DONE])
    resp = await http.post(sc.url + PATH, json={})
    assert resp.status == 200
    await read_events(resp, 1)
    await gate.reached.wait()
    resp.close()
    server = await spans.one("POST", SpanKind.SERVER)
    gate.open()
    await sc.flushed()
    assert (
        sc.metric("sse_sidecar_http_requests_total", route="proxy", method="POST", code="500") == 0
    )
    assert attrs(server)["http.response.status_code"] == 200
    assert server.status.status_code is not StatusCode.ERROR


async def test_an_incoming_traceparent_is_continued(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, _ = await teed_run(
        sc.url,
        upstream,
        http,
        [token("a"), stop("end_turn"), DONE],
        headers={"traceparent": CALLER_TRACEPARENT},
    )
    await sc.flushed()
    server = await spans.one("POST", SpanKind.SERVER)
    client = await spans.one("POST", SpanKind.CLIENT)
    run = await spans.one("sse.run")
    assert ctx(server).trace_id == CALLER_TRACE
    assert server.parent is not None
    assert server.parent.span_id == CALLER_SPAN
    assert server.parent.is_remote
    assert is_child(client, server)
    assert is_child(run, server)
    # The upstream continues the caller's trace under the client span, not the caller's span.
    assert upstream.requests[-1].headers["traceparent"] == traceparent(client)
    assert traceparent(client).startswith(f"00-{CALLER_TRACE:032x}-")
    assert (await meta(redis_client, run_id))["trace_id"] == f"{CALLER_TRACE:032x}"


# -- replay -----------------------------------------------------------------------------------


async def test_replay_has_a_routed_server_span_and_an_sse_replay_child(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    run_id, body = await teed_run(
        sc.url, upstream, http, [token("a"), token("b"), stop("end_turn"), DONE]
    )
    await sc.flushed()
    path = f"/sidecar/v1/runs/{run_id}/stream"
    name = f"GET {REPLAY_TEMPLATE}"
    async with http.get(sc.url + path) as resp:
        assert resp.status == 200
        assert await resp.read() == body
    server = await spans.one(name, SpanKind.SERVER)
    replay = await spans.one("sse.replay")
    assert server.parent is None
    assert attrs(server) == {
        "http.request.method": "GET",
        "url.path": path,
        "http.route": REPLAY_TEMPLATE,
        "http.response.status_code": 200,
    }
    assert replay.kind is SpanKind.INTERNAL
    assert is_child(replay, server)
    assert attrs(replay) == {
        "sse.run_id": run_id,
        "sse.cursor": 0,
        "sse.events": 4,
        "sse.outcome": "complete",
    }

    # From a cursor: the span says where the reader started and how much it got.
    async with http.get(sc.url + path, headers={"Last-Event-ID": "1"}) as resp:
        assert resp.status == 200
        await resp.read()
    await spans.until(lambda: len(spans.named("sse.replay")) == 2)
    second = next(s for s in spans.named("sse.replay") if s is not replay)
    assert attrs(second) == {
        "sse.run_id": run_id,
        "sse.cursor": 1,
        "sse.events": 3,
        "sse.outcome": "complete",
    }
    await spans.until(lambda: len(spans.named(name, SpanKind.SERVER)) == 2)
    assert all(
        attrs(s)["http.route"] == REPLAY_TEMPLATE for s in spans.named(name, SpanKind.SERVER)
    )


# -- exemplars --------------------------------------------------------------------------------


async def test_latency_histograms_carry_trace_id_exemplars_in_openmetrics_only(
    spans: Spans,
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(tracer=spans.tracer)
    await teed_run(sc.url, upstream, http, [token("a"), stop("end_turn"), DONE])
    await sc.flushed()
    server = await spans.one("POST", SpanKind.SERVER)
    run = await spans.one("sse.run")
    assert trace_hex(run) == trace_hex(server)
    flush_traces = {trace_hex(f) for f in spans.named("sse.flush")}

    ctype, text = await get_text(http, sc.admin_url + "/metrics", OPENMETRICS)
    assert ctype.startswith("application/openmetrics-text")
    found = exemplars(text)
    assert set(found) == set(LATENCY_BUCKETS)
    # One observation each, in the one trace of the request.
    assert found["sse_sidecar_http_request_duration_seconds_bucket"] == [trace_hex(server)]
    assert found["sse_sidecar_run_duration_seconds_bucket"] == [trace_hex(run)]
    assert found["sse_sidecar_upstream_first_event_seconds_bucket"] == [trace_hex(run)]
    # Flushes are traces of their own.
    assert found["sse_sidecar_flush_duration_seconds_bucket"]
    assert set(found["sse_sidecar_flush_duration_seconds_bucket"]) <= flush_traces
    # Exemplars sit on bucket lines only.
    assert all(name.endswith("_bucket") for name in found)

    ctype, plain = await get_text(http, sc.admin_url + "/metrics")
    assert ctype.startswith("text/plain")
    assert " # {" not in plain
    assert "trace_id" not in plain
    typed = re.findall(r"^# TYPE (\S+) ", plain, re.MULTILINE)
    helped = dict(re.findall(r"^# HELP (\S+) (.*)$", plain, re.MULTILINE))
    assert typed
    assert set(typed) == set(helped)
    assert all(text.strip() for text in helped.values())


async def test_without_a_tracer_everything_works_and_nothing_is_traced(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()  # the default: a no-op tracer
    run_id, body = await teed_run(sc.url, upstream, http, [token("a"), stop("end_turn"), DONE])
    await sc.flushed()
    assert "traceparent" not in {k.lower() for k in upstream.requests[-1].headers}
    m = await meta(redis_client, run_id)
    assert m["status"] == "completed"
    assert "trace_id" not in m
    async with http.get(sc.url + f"/sidecar/v1/runs/{run_id}/stream") as resp:
        assert resp.status == 200
        assert await resp.read() == body
    _, text = await get_text(http, sc.admin_url + "/metrics", OPENMETRICS)
    assert exemplars(text) == {}
    assert "trace_id" not in text
    for bucket in LATENCY_BUCKETS:
        assert f"\n{bucket}{{" in text  # the histograms were observed, just without exemplars


async def test_without_a_tracer_a_callers_traceparent_still_reaches_the_upstream(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar()
    await teed_run(
        sc.url,
        upstream,
        http,
        [token("a"), stop("end_turn"), DONE],
        headers={"traceparent": CALLER_TRACEPARENT},
    )
    await sc.flushed()
    assert upstream.requests[-1].headers["traceparent"] == CALLER_TRACEPARENT
