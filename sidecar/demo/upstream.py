"""A demo LLM service that streams like Letta, OpenAI and Anthropic do, including the ways real
streams end badly (``sidecar/demo/protocols.py`` has the event sequences).

| route | protocol |
|---|---|
| ``POST /v1/agents/{agent_id}/messages/stream``, ``POST /v1/agents/{agent_id}/messages``,
  ``GET /v1/stream`` | Letta (always streamed) |
| ``POST /v1/chat/completions`` | OpenAI Chat Completions |
| ``POST /v1/responses`` | OpenAI Responses |
| ``GET /v1/responses/{id}?stream=true&starting_after=N`` | OpenAI Responses resume |
| ``POST /v1/messages`` | Anthropic Messages |
| ``GET /v1/events`` | a generic event stream (plain text events) |

Each answers with ``text/event-stream``, ``tokens`` chunks ``delay_ms`` apart, and the ending of
the chosen scenario. The scenario comes from the JSON body field ``scenario`` or the query
``?scenario=`` (the query wins); ``tokens`` and ``delay_ms`` are read the same way, so an SDK
passes them with ``extra_body`` or ``extra_query``. Letta payloads carry ``"seq_id": null`` and
``"run_id": null`` on purpose: filling them is the sidecar's job. When the body has ``run_id``, it
comes back as the ``X-Run-Id`` response header (the sidecar then uses it as the run id). A request
header ``X-Demo-Id: <id>`` makes the stream reproducible (ids from it, fixed timestamps).

Other routes: ``GET /v1/health``, ``POST /v1/echo`` (a JSON echo of the request, to show that
non-SSE traffic passes through the sidecar untouched) and ``GET /v1/agents``.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import OrderedDict
from typing import Any

from aiohttp import web

from sidecar.demo.protocols import (
    ANTHROPIC,
    GENERIC,
    LETTA,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    Protocol,
    StreamRequest,
)

DEFAULT_TOKENS = 12
DEFAULT_DELAY_MS = 20
MAX_TOKENS = 10_000
MAX_DELAY_MS = 60_000
# Responses kept for the resume route, newest last.
MAX_KEPT_RESPONSES = 64

# The Letta scenarios (the other protocols' are in their Protocol.endings).
ENDINGS = LETTA.endings
SCENARIOS = tuple(ENDINGS)
# route name -> the protocol it streams
PROTOCOLS: web.AppKey[dict[str, Protocol]] = web.AppKey("protocols")
# response id -> its events, for the resume route
KEPT: web.AppKey[OrderedDict[str, list[bytes]]] = web.AppKey("kept_responses")


class BadRequest(Exception):
    def __init__(self, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.extra = extra


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


async def _parse_stream_request(request: web.Request, protocol: Protocol) -> StreamRequest:
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
    if scenario not in protocol.endings:
        valid = tuple(protocol.endings)
        raise BadRequest(
            "bad_scenario",
            f"unknown {protocol.name} scenario {scenario!r}; valid scenarios: {', '.join(valid)}",
            scenarios=list(valid),
        )
    run_id = body.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise BadRequest("bad_request", f"run_id must be a string, got {run_id!r}")
    options = body.get("stream_options")
    extra: dict[str, Any] = {}
    if (demo_id := request.headers.get("X-Demo-Id")) is not None:
        extra = {"ident": demo_id, "fixed": True}
    return StreamRequest(
        scenario=scenario,
        tokens=_int_param("tokens", param("tokens"), DEFAULT_TOKENS, MAX_TOKENS),
        delay_ms=_int_param("delay_ms", param("delay_ms"), DEFAULT_DELAY_MS, MAX_DELAY_MS),
        run_id=run_id,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        **extra,
    )


async def stream(request: web.Request) -> web.StreamResponse:
    protocol = request.app[PROTOCOLS][request.match_info.route.name or ""]
    try:
        req = await _parse_stream_request(request, protocol)
    except BadRequest as exc:
        return _error(400, exc.type, exc.message, **exc.extra)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    if req.run_id is not None:
        headers["X-Run-Id"] = req.run_id
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    kept: list[bytes] | None = None
    if protocol is OPENAI_RESPONSES:
        kept = _keep(request.app, f"resp_{req.ident}")
    try:
        for i, chunk in enumerate(protocol.chunks(req)):
            if i and req.delay_ms:
                await asyncio.sleep(req.delay_ms / 1000)
            if kept is not None:
                kept.append(chunk)
            await resp.write(chunk)
        if req.scenario == "reset":
            # Cut the connection without finishing the chunked body: the client sees a broken
            # response, not a clean end.
            if request.transport is not None:
                request.transport.abort()
            return resp
        # A clean end of the body: after the terminal, or without any ("dies", "*_no_done").
        await resp.write_eof()
    except ConnectionResetError:
        # The client (or the sidecar, once it has read the terminal) closed the connection first.
        pass
    return resp


def _keep(app: web.Application, response_id: str) -> list[bytes]:
    """The list a Responses stream's events are kept in, for the resume route (bounded)."""
    kept = app[KEPT]
    events: list[bytes] = []
    kept[response_id] = events
    while len(kept) > MAX_KEPT_RESPONSES:
        kept.popitem(last=False)
    return events


async def resume_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}?stream=true&starting_after=N``: a kept stream's events with a
    ``sequence_number`` above N, as OpenAI serves a background response's stream again."""
    if request.query.get("stream", "").lower() != "true":
        return _error(400, "bad_request", "this demo only serves ?stream=true")
    events = request.app[KEPT].get(request.match_info["response_id"])
    if events is None:
        return _error(404, "not_found", "no such response")
    try:
        after = int(request.query.get("starting_after", "-1"))
    except ValueError:
        return _error(400, "bad_request", "starting_after must be an integer")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for chunk in list(events):
        payload = json.loads(chunk.split(b"data: ", 1)[1])
        if payload["sequence_number"] > after:
            await resp.write(chunk)
    await resp.write_eof()
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
    app[KEPT] = OrderedDict()
    app[PROTOCOLS] = {}
    for name, method, path, protocol in (
        ("letta", "POST", "/v1/agents/{agent_id}/messages/stream", LETTA),
        ("letta_create", "POST", "/v1/agents/{agent_id}/messages", LETTA),
        ("letta_get", "GET", "/v1/stream", LETTA),
        ("chat", "POST", "/v1/chat/completions", OPENAI_CHAT),
        ("responses", "POST", "/v1/responses", OPENAI_RESPONSES),
        ("messages", "POST", "/v1/messages", ANTHROPIC),
        ("events", "GET", "/v1/events", GENERIC),
    ):
        app[PROTOCOLS][name] = protocol
        app.router.add_route(method, path, stream, name=name)
    app.router.add_get("/v1/responses/{response_id}", resume_response)
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
