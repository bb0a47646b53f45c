"""The exporter wiring: spans reach a real OTLP/HTTP receiver (DESIGN.md "Telemetry").

The receiver is an aiohttp server in the test that accepts ``POST /v1/traces`` and decodes the
protobuf body with ``opentelemetry-proto``. The provider is built the way ``serve()`` builds it
(``tracer_provider_from_env``), in process and through ``python -m sidecar serve``, whose spans
must be flushed on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import TracerProvider

from sidecar import __version__
from sidecar.tracing import TRACER_NAME, tracer_of, tracer_provider_from_env
from tests.conftest import RedisServer, SidecarFactory, Upstream, free_port
from tests.functional.helpers import DONE, eventually, meta, stop, stream, token

PATH = "/v1/agents/agent-1/messages/stream"
REPLAY_NAME = "GET /sidecar/v1/runs/{run_id}/stream"
OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_TRACES_SAMPLER",
)


@dataclass
class Received:
    resource: dict[str, Any]
    scope: str
    span: PbSpan

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return decode(self.span.attributes)


def value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    return None if which is None else getattr(v, which)


def decode(kvs: Any) -> dict[str, Any]:
    pairs: list[KeyValue] = list(kvs)
    return {kv.key: value(kv.value) for kv in pairs}


class Receiver:
    """A minimal OTLP/HTTP trace receiver."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.content_types.append(request.content_type)
        self.requests.append(message)
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def spans(self) -> list[Received]:
        out: list[Received] = []
        for req in self.requests:
            for rs in req.resource_spans:
                resource = decode(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out.extend(Received(resource, ss.scope.name, span) for span in ss.spans)
        return out

    def named(self, name: str, kind: int | None = None) -> list[Received]:
        return [s for s in self.spans() if s.name == name and (kind is None or s.span.kind == kind)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = web.AppRunner(rec.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port).start()
    yield rec
    await runner.cleanup()


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable of the test runner's own environment leaks into a test."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def providers() -> Iterator[list[TracerProvider]]:
    made: list[TracerProvider] = []
    yield made
    for p in made:
        p.shutdown()


def exporter_of(provider: TracerProvider) -> Any:
    """The exporter behind the provider's one BatchSpanProcessor (SDK internals, read only)."""
    processors = provider._active_span_processor._span_processors
    assert len(processors) == 1
    batch: Any = processors[0]
    return batch._batch_processor._exporter


async def flush(provider: TracerProvider) -> None:
    # The exporter posts from the processor's thread and blocks; the receiver lives in this loop.
    assert await asyncio.to_thread(provider.force_flush, 10_000)


def hex_id(raw: bytes) -> str:
    return raw.hex()


# -- in process: the provider serve() builds, exporting to the receiver -----------------------


async def test_spans_of_a_run_and_its_replay_reach_an_otlp_http_receiver(
    receiver: Receiver,
    clean_otel_env: pytest.MonkeyPatch,
    providers: list[TracerProvider],
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    for key, val in env.items():
        clean_otel_env.setenv(key, val)  # the exporter reads its endpoint from os.environ
    provider = tracer_provider_from_env(env)
    assert provider is not None
    providers.append(provider)
    assert isinstance(exporter_of(provider), HttpSpanExporter)

    sc = await make_sidecar(tracer=tracer_of(provider))
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    view = await stream(http, sc.url + PATH, json={"messages": []})
    assert view.status == 200
    run_id = view.run_id
    await sc.flushed()
    async with http.get(sc.url + f"/sidecar/v1/runs/{run_id}/stream") as resp:
        assert resp.status == 200
        assert await resp.read() == view.body
    trace_id = (await meta(redis_client, run_id))["trace_id"]
    await sc.stop()  # every handler has returned: every span has ended
    assert receiver.requests == []  # batched: nothing was sent before the flush
    await flush(provider)

    assert receiver.requests
    assert set(receiver.content_types) == {"application/x-protobuf"}
    for s in receiver.spans():
        assert s.resource["service.name"] == "sse-sidecar"
        assert s.resource["service.version"] == __version__
        assert s.scope == TRACER_NAME

    server = receiver.named("POST", PbSpan.SPAN_KIND_SERVER)
    client = receiver.named("POST", PbSpan.SPAN_KIND_CLIENT)
    runs = receiver.named("sse.run")
    flushes = receiver.named("sse.flush")
    replay_server = receiver.named(REPLAY_NAME, PbSpan.SPAN_KIND_SERVER)
    replays = receiver.named("sse.replay")
    assert [len(server), len(client), len(runs), len(replay_server), len(replays)] == [1] * 5
    assert flushes

    srv, cli, run = server[0].span, client[0].span, runs[0].span
    assert hex_id(srv.trace_id) == hex_id(cli.trace_id) == hex_id(run.trace_id) == trace_id
    assert srv.parent_span_id == b""
    assert cli.parent_span_id == srv.span_id
    assert run.parent_span_id == srv.span_id
    assert run.kind == PbSpan.SPAN_KIND_INTERNAL
    assert server[0].attributes["http.response.status_code"] == 200
    assert upstream.requests[-1].headers["traceparent"].split("-")[1:3] == [
        hex_id(cli.trace_id),
        hex_id(cli.span_id),
    ]
    assert runs[0].attributes == {
        "sse.run_id": run_id,
        "sse.dialect": "letta",
        "sse.status": "completed",
        "sse.stop_reason": "end_turn",
        "sse.events": 3,
        "sse.bytes": len(view.body),
        "sse.forced_done": "",
    }
    assert [(e.name, decode(e.attributes)) for e in run.events] == [("saw_done", {"sse.seq": 3})]
    for f in flushes:
        assert f.span.kind == PbSpan.SPAN_KIND_CLIENT
        assert f.span.parent_span_id == b""
        assert f.attributes["sse.flush.outcome"] == "ok"
        assert [(link.trace_id, link.span_id) for link in f.span.links] == [
            (run.trace_id, run.span_id)
        ]
    assert sum(f.attributes["sse.flush.events"] for f in flushes) == 3
    assert replays[0].span.parent_span_id == replay_server[0].span.span_id
    assert replays[0].attributes == {
        "sse.run_id": run_id,
        "sse.cursor": 0,
        "sse.events": 3,
        "sse.outcome": "complete",
    }


async def test_the_traces_endpoint_variable_is_used_as_is(
    receiver: Receiver,
    clean_otel_env: pytest.MonkeyPatch,
    providers: list[TracerProvider],
) -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces"}
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/v1/traces")
    provider = tracer_provider_from_env(env)
    assert provider is not None
    providers.append(provider)
    tracer_of(provider).start_span("probe").end()
    await flush(provider)
    assert [s.name for s in receiver.spans()] == ["probe"]


# -- the real CLI: spans flushed on SIGTERM ---------------------------------------------------


async def test_serve_exports_spans_and_flushes_them_on_sigterm(
    receiver: Receiver,
    upstream: Upstream,
    redis_server: RedisServer,
    redis_client: redis.asyncio.Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    # A batch delay far longer than the test: only the shutdown flush can deliver the spans.
    env["OTEL_BSP_SCHEDULE_DELAY"] = "600000"
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sidecar", "serve", "--upstream-url", upstream.url),
            *("--redis-url", redis_server.url, "--host", "127.0.0.1"),
            *("--port", str(port), "--admin-port", str(admin), "--drain-seconds", "2"),
            *("--log-format", "text"),
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"sidecar exited early:\n{log.read_text()}")
            try:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, timeout=20, interval=0.05, what="the sidecar's /readyz")
        upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
        view = await stream(http, f"http://127.0.0.1:{port}{PATH}", json={})
        assert view.status == 200
        assert receiver.requests == []
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    names = {(s.name, s.span.kind) for s in receiver.spans()}
    assert ("POST", PbSpan.SPAN_KIND_SERVER) in names
    assert ("POST", PbSpan.SPAN_KIND_CLIENT) in names
    assert ("sse.run", PbSpan.SPAN_KIND_INTERNAL) in names
    assert ("sse.flush", PbSpan.SPAN_KIND_CLIENT) in names
    run = receiver.named("sse.run")
    assert len(run) == 1
    assert run[0].attributes["sse.run_id"] == view.run_id
    assert run[0].attributes["sse.status"] == "completed"
    assert {s.resource["service.name"] for s in receiver.spans()} == {"sse-sidecar"}
    assert hex_id(run[0].span.trace_id) == (await meta(redis_client, view.run_id))["trace_id"]


# -- tracer_provider_from_env -----------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        {"OTEL_SDK_DISABLED": " TRUE ", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318"},
    ],
)
def test_no_provider_without_an_endpoint_or_when_disabled(env: dict[str, str]) -> None:
    assert tracer_provider_from_env(env) is None


def test_disabled_false_still_exports(
    clean_otel_env: pytest.MonkeyPatch, providers: list[TracerProvider]
) -> None:
    provider = tracer_provider_from_env(
        {"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )
    assert provider is not None
    providers.append(provider)


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match=r"http/protobuf or grpc, got 'http/json'"):
        tracer_provider_from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            }
        )


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, GrpcSpanExporter),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": " grpc "}, GrpcSpanExporter),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, HttpSpanExporter),
        ({}, HttpSpanExporter),  # the default
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            GrpcSpanExporter,
        ),
    ],
)
def test_the_protocol_picks_the_exporter(
    env: dict[str, str],
    kind: type,
    clean_otel_env: pytest.MonkeyPatch,
    providers: list[TracerProvider],
) -> None:
    provider = tracer_provider_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", **env}
    )
    assert provider is not None
    providers.append(provider)
    assert type(exporter_of(provider)) is kind
    assert provider.resource.attributes["service.name"] == "sse-sidecar"
    assert provider.resource.attributes["service.version"] == __version__


def test_resource_attributes_from_the_environment_are_kept(
    clean_otel_env: pytest.MonkeyPatch, providers: list[TracerProvider]
) -> None:
    clean_otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,team=infra")
    provider = tracer_provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert provider is not None
    providers.append(provider)
    attributes = provider.resource.attributes
    assert attributes["deployment.environment"] == "prod"
    assert attributes["team"] == "infra"
    assert attributes["service.name"] == "sse-sidecar"


def test_otel_service_name_is_honoured(
    clean_otel_env: pytest.MonkeyPatch, providers: list[TracerProvider]
) -> None:
    clean_otel_env.setenv("OTEL_SERVICE_NAME", "checkout-sidecar")
    provider = tracer_provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert provider is not None
    providers.append(provider)
    assert provider.resource.attributes["service.name"] == "checkout-sidecar"


async def test_the_endpoint_of_the_given_mapping_is_the_one_exported_to(
    receiver: Receiver,
    clean_otel_env: pytest.MonkeyPatch,
    providers: list[TracerProvider],
) -> None:
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # fail fast where it does go
    provider = tracer_provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    assert provider is not None
    providers.append(provider)
    tracer_of(provider).start_span("probe").end()
    await asyncio.to_thread(provider.force_flush, 5_000)
    assert [s.name for s in receiver.spans()] == ["probe"]
