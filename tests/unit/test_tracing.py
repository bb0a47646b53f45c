"""sidecar/tracing.py helpers and the trace fields of sidecar.telemetry.JsonFormatter."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext, TraceFlags

from sidecar.telemetry import JsonFormatter
from sidecar.tracing import TRACER_NAME, exemplar, trace_ids, tracer_of

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    p = TracerProvider()
    yield p
    p.shutdown()


def record(message: str = "hello", **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("sidecar.test", logging.WARNING, __file__, 1, message, None, None)
    r.__dict__.update(extra)
    return r


def test_no_span_has_no_ids_and_no_exemplar() -> None:
    assert trace.get_current_span() is INVALID_SPAN
    assert trace_ids() is None
    assert exemplar() is None
    assert trace_ids(INVALID_SPAN) is None
    assert exemplar(INVALID_SPAN) is None


def test_a_no_op_span_has_no_ids_and_no_exemplar() -> None:
    tracer = tracer_of(None)
    assert isinstance(tracer, trace.NoOpTracer)
    with tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
        assert trace_ids(span) is None
        assert trace_ids() is None
        assert exemplar(span) is None
        assert exemplar() is None


def test_a_real_span_has_32_and_16_hex_ids(provider: TracerProvider) -> None:
    tracer = tracer_of(provider)
    with tracer.start_as_current_span("x") as span:
        assert span.is_recording()
        ids = trace_ids(span)
        assert ids is not None
        trace_id, span_id = ids
        assert HEX32.match(trace_id)
        assert HEX16.match(span_id)
        ctx = span.get_span_context()
        assert (int(trace_id, 16), int(span_id, 16)) == (ctx.trace_id, ctx.span_id)
        assert trace_ids() == ids  # the current span by default
        assert exemplar(span) == {"trace_id": trace_id}
        assert exemplar() == {"trace_id": trace_id}
        with tracer.start_as_current_span("child") as child:
            assert trace_ids() == trace_ids(child)
            child_ids = trace_ids(child)
            assert child_ids is not None
            assert child_ids[0] == trace_id
            assert child_ids[1] != span_id
        assert trace_ids() == ids
    assert trace_ids() is None
    # An ended span still names its trace (the forced-terminal warning is logged after end()).
    assert trace_ids(span) == ids


def test_ids_are_zero_padded() -> None:
    ctx = SpanContext(trace_id=1, span_id=2, is_remote=False, trace_flags=TraceFlags(1))
    span = NonRecordingSpan(ctx)
    assert trace_ids(span) == ("0" * 31 + "1", "0" * 15 + "2")
    assert exemplar(span) == {"trace_id": "0" * 31 + "1"}


def test_tracer_of_a_provider_is_named_after_the_sidecar(provider: TracerProvider) -> None:
    tracer = tracer_of(provider)
    span = tracer.start_span("x")
    span.end()
    scope = getattr(span, "instrumentation_scope", None)
    assert scope is not None
    assert scope.name == TRACER_NAME


def test_json_formatter_adds_trace_and_span_ids_inside_a_span(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("t")
    fmt = JsonFormatter()
    with tracer.start_as_current_span("work") as span:
        line = json.loads(fmt.format(record(run_id="run_1")))
        ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"
    assert line["run_id"] == "run_1"
    assert line["level"] == "warning"
    assert line["message"] == "hello"


def test_json_formatter_has_no_trace_fields_outside_a_span(provider: TracerProvider) -> None:
    fmt = JsonFormatter()
    line = json.loads(fmt.format(record(run_id="run_1")))
    assert "trace_id" not in line
    assert "span_id" not in line
    assert line["run_id"] == "run_1"
    with tracer_of(None).start_as_current_span("no-op"):
        assert "trace_id" not in json.loads(fmt.format(record()))


def test_json_formatter_reads_the_span_current_when_it_formats(provider: TracerProvider) -> None:
    """The ids come from the context formatting happens in: a record formatted later, outside
    its span, carries none (the real handler formats at emit time, in the emitting context)."""
    tracer = provider.get_tracer("t")
    fmt = JsonFormatter()
    with tracer.start_as_current_span("emit"):
        r = record()
    assert "trace_id" not in json.loads(fmt.format(r))
    with tracer.start_as_current_span("other") as other:
        line = json.loads(fmt.format(r))
    assert line["span_id"] == f"{other.get_span_context().span_id:016x}"
