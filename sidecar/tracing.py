"""OpenTelemetry tracing: the tracer the app is given, and the helpers its parts share.

Spans go out over OTLP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, with ``OTEL_EXPORTER_OTLP_PROTOCOL``
``http/protobuf`` (default) or ``grpc``; the exporter reads its other ``OTEL_*`` variables
(headers, timeout, certificates) itself, and the resource honours ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``. With no endpoint, or ``OTEL_SDK_DISABLED=true``, the app gets a
no-op tracer: no span is built, nothing is exported, nothing slows down.

Spans: the server span of every request (W3C ``traceparent`` accepted), the upstream client span
(``traceparent`` sent upstream), ``sse.run`` for a tee, ``sse.flush`` for a writer round trip
(linked to the runs it carried), ``sse.replay`` for a replay reader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanContext, Tracer

from sidecar import __version__

TRACER_NAME = "sse-sidecar"


def tracer_provider_from_env(
    environ: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """A provider exporting over OTLP as the ``OTEL_*`` variables say; None when not asked to."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    endpoint = traces_endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        # The generic endpoint is a base URL the signal's path is appended to (OTLP spec).
        url = traces_endpoint or endpoint.rstrip("/") + "/v1/traces"
        exporter = HTTPSpanExporter(endpoint=url)
    else:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf or grpc, got {protocol!r}"
        )
    attributes = {"service.version": __version__}
    # Resource.create reads the process environment for OTEL_SERVICE_NAME and
    # OTEL_RESOURCE_ATTRIBUTES; our name is only a default for when neither names the service.
    named = any(
        e.get("OTEL_SERVICE_NAME") or "service.name=" in e.get("OTEL_RESOURCE_ATTRIBUTES", "")
        for e in (env, os.environ)
    )
    if not named:
        attributes["service.name"] = "sse-sidecar"
    resource = Resource.create(attributes)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer:
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(TRACER_NAME, __version__)


def trace_ids(span: Span | None = None) -> tuple[str, str] | None:
    """(trace_id, span_id) as hex of ``span`` (default: the current one), if it is real."""
    ctx: SpanContext = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def exemplar(span: Span | None = None) -> dict[str, str] | None:
    """A Prometheus exemplar linking a histogram observation to its trace."""
    ids = trace_ids(span)
    return None if ids is None else {"trace_id": ids[0]}
