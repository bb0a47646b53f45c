"""Log lines: a forced terminal warns exactly once, with context; a natural end stays quiet."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from sidecar.telemetry import JsonFormatter, TextFormatter
from tests.conftest import Sidecar, Upstream
from tests.functional.helpers import DONE, error, stop, stream, token

PATH = "/v1/stream"


def _sidecar_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("sidecar") and r.levelno >= level]


async def test_a_forced_terminal_logs_exactly_one_warning_with_its_context(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar")
    upstream.sse(PATH, [token("a"), error(), token("b")])  # error, then EOF without [DONE]
    view = await stream(http, sidecar.url + PATH)
    await sidecar.flushed()
    warnings = _sidecar_records(caplog, logging.WARNING)
    assert len(warnings) == 1
    record = warnings[0]
    assert record.levelno == logging.WARNING
    assert record.__dict__["run_id"] == view.run_id
    assert record.__dict__["reason"] == "missing_done_after_error"
    assert record.__dict__["saw_error"] is True
    assert record.__dict__["saw_done"] is False
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning"
    assert line["run_id"] == view.run_id
    assert line["reason"] == "missing_done_after_error"
    assert f"run_id={view.run_id}" in TextFormatter().format(record)


async def test_error_then_done_logs_nothing_above_debug(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar")
    upstream.sse(PATH, [token("a"), stop("llm_api_error"), error(), DONE])
    view = await stream(http, sidecar.url + PATH)
    await sidecar.flushed()
    assert _sidecar_records(caplog, logging.INFO) == []
    debug = [r for r in _sidecar_records(caplog, logging.DEBUG) if "run_id" in r.__dict__]
    assert [r.__dict__["run_id"] for r in debug] == [view.run_id]
