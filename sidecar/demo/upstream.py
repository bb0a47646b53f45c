"""A demo LLM service that streams like Letta does, including the ways real streams end badly.

``POST /v1/agents/{agent_id}/messages/stream`` (Letta's streaming route) and ``GET /v1/stream``
(handy for curl) answer with ``text/event-stream``::

    : ping
    data: {"id": "message-...", "message_type": "reasoning_message", ...}
    data: {"id": "message-...", "message_type": "assistant_message", "content": "The ", ...}
    ...                                  (``tokens`` chunks, ``delay_ms`` apart)
    <the ending of the chosen scenario>

The scenario comes from the JSON body field ``scenario`` or the query ``?scenario=`` (the query
wins); ``tokens`` and ``delay_ms`` are read the same way. Payloads carry ``"seq_id": null`` and
``"run_id": null`` on purpose: filling them is the sidecar's job. When the body has ``run_id``, it
comes back as the ``X-Run-Id`` response header (the sidecar then uses it as the run id).

Other routes: ``GET /v1/health``, ``POST /v1/echo`` (a JSON echo of the request, to show that
non-SSE traffic passes through the sidecar untouched) and ``GET /v1/agents``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

DEFAULT_TOKENS = 12
DEFAULT_DELAY_MS = 20
MAX_TOKENS = 10_000
MAX_DELAY_MS = 60_000

# How each scenario ends, after the ping, the reasoning message and the token chunks.
ENDINGS: dict[str, str] = {
    "normal": "stop_reason end_turn, usage_statistics, [DONE]",
    "error_then_done": "stop_reason llm_api_error, event: error, [DONE] (a well-behaved error)",
    "dies": "nothing: the response ends cleanly without any terminal",
    "error_no_done": "stop_reason error, event: error, clean end without [DONE]",
    "stop_no_done": "stop_reason end_turn, clean end without [DONE]",
    "reset": "nothing: the TCP connection is cut mid-stream",
}
SCENARIOS = tuple(ENDINGS)

_ANSWER = (
    "Server-sent events carry an answer to the client one token at a time, and a sidecar "
    "next to the service keeps a copy of every event so nothing is lost when the client drops."
)
_WORDS = _ANSWER.split()


class BadRequest(Exception):
    def __init__(self, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.extra = extra


@dataclass(frozen=True, slots=True)
class StreamRequest:
    scenario: str
    tokens: int
    delay_ms: int
    run_id: str | None


def _error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"type": type_, "message": message, **extra}}, status=status)


def _int_param(name: str, raw: Any, default: int, maximum: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise BadRequest("bad_request", f"{name} must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadRequest("bad_request", f"{name} must be an integer, got {raw!r}") from None
    if not 0 <= value <= maximum:
        raise BadRequest("bad_request", f"{name} must be between 0 and {maximum}, got {value}")
    return value


async def _parse_stream_request(request: web.Request) -> StreamRequest:
    body: dict[str, Any] = {}
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                raise BadRequest("bad_request", f"the body is not JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise BadRequest("bad_request", "the body must be a JSON object")
            body = parsed

    def param(name: str) -> Any:
        # The query string wins over the body.
        return request.query.get(name, body.get(name))

    scenario = param("scenario") or "normal"
    if scenario not in ENDINGS:
        raise BadRequest(
            "bad_scenario",
            f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}",
            scenarios=list(SCENARIOS),
        )
    run_id = body.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise BadRequest("bad_request", f"run_id must be a string, got {run_id!r}")
    return StreamRequest(
        scenario=scenario,
        tokens=_int_param("tokens", param("tokens"), DEFAULT_TOKENS, MAX_TOKENS),
        delay_ms=_int_param("delay_ms", param("delay_ms"), DEFAULT_DELAY_MS, MAX_DELAY_MS),
        run_id=run_id,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _data(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def _message(message_id: str, message_type: str, **fields: Any) -> bytes:
    payload = {"id": message_id, "date": _now(), "message_type": message_type, **fields}
    # Null on purpose: the sidecar fills seq_id and run_id (letta dialect).
    payload.update(seq_id=None, run_id=None)
    return _data(payload)


def _stop_reason(reason: str) -> bytes:
    return _data({"message_type": "stop_reason", "stop_reason": reason})


def _error_event(message: str, detail: str) -> bytes:
    payload = {
        "message_type": "error_message",
        "error_type": "llm_error",
        "message": message,
        "detail": detail,
    }
    return b"event: error\n" + _data(payload)


def _usage(tokens: int) -> bytes:
    return _data(
        {
            "message_type": "usage_statistics",
            "completion_tokens": tokens,
            "prompt_tokens": 42,
            "total_tokens": tokens + 42,
            "step_count": 1,
        }
    )


DONE = _data("[DONE]")


def _chunks(req: StreamRequest) -> Iterator[bytes]:
    """The response body, one SSE item per chunk, made as it is sent (so dates are real)."""
    yield b": ping\n\n"
    yield _message(
        f"message-{uuid.uuid4()}",
        "reasoning_message",
        source="reasoner_model",
        reasoning=f"The user asked for the {req.scenario!r} demo; I will answer briefly.",
    )
    answer_id = f"message-{uuid.uuid4()}"  # every chunk of one message shares its id
    for i in range(req.tokens):
        yield _message(answer_id, "assistant_message", content=_WORDS[i % len(_WORDS)] + " ")
    if req.scenario == "normal":
        yield _stop_reason("end_turn")
        yield _usage(req.tokens)
        yield DONE
    elif req.scenario == "error_then_done":
        yield _stop_reason("llm_api_error")
        yield _error_event("The model provider failed", "the provider answered HTTP 529")
        yield DONE
    elif req.scenario == "error_no_done":
        yield _stop_reason("error")
        yield _error_event("The agent step failed", "the service crashed before [DONE]")
    elif req.scenario == "stop_no_done":
        yield _stop_reason("end_turn")
    # "dies" and "reset" have no terminal at all.


async def stream(request: web.Request) -> web.StreamResponse:
    try:
        req = await _parse_stream_request(request)
    except BadRequest as exc:
        return _error(400, exc.type, exc.message, **exc.extra)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    if req.run_id is not None:
        headers["X-Run-Id"] = req.run_id
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    try:
        for i, chunk in enumerate(_chunks(req)):
            if i and req.delay_ms:
                await asyncio.sleep(req.delay_ms / 1000)
            await resp.write(chunk)
        if req.scenario == "reset":
            # Cut the connection without finishing the chunked body: the client sees a broken
            # response, not a clean end.
            if request.transport is not None:
                request.transport.abort()
            return resp
        # A clean end of the body: after [DONE], or without any terminal ("dies", "*_no_done").
        await resp.write_eof()
    except ConnectionResetError:
        # The client (or the sidecar, once it has read [DONE]) closed the connection first.
        pass
    return resp


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": dict(request.headers),
            "body_length": len(body),
        }
    )


async def agents(request: web.Request) -> web.Response:
    return web.json_response(
        [
            {"id": "agent-demo", "name": "demo agent", "model": "demo/llm-1"},
            {"id": "agent-flaky", "name": "flaky agent", "model": "demo/llm-1"},
        ]
    )


def create_upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/agents/{agent_id}/messages/stream", stream)
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/echo", echo)
    app.router.add_get("/v1/agents", agents)
    return app


async def run_upstream(host: str, port: int) -> None:
    """Serve the demo upstream until cancelled, SIGINT or SIGTERM."""
    runner = web.AppRunner(create_upstream_app(), handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        await web.TCPSite(runner, host, port).start()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        print(f"demo upstream listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
