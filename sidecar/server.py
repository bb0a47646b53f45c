"""The traffic port's HTTP server: deadlines for slow clients, one quiet line for bad requests.

aiohttp closes idle keep-alive connections (``keepalive_timeout``) but has no deadline for a
request's headers: a client that sends half a request and stops holds its connection for as long
as it likes (slowloris). ``GuardedRequestHandler`` adds it at the protocol level, where the bytes
arrive: the headers of a connection's first request must be complete within
``request_header_timeout_seconds`` of the connection's start, those of a later request within
that time of its first byte; past it the client gets ``408`` and the connection is closed.
(Request bodies are bounded where they are read: ``sidecar.request_body``.)

A request aiohttp cannot parse is the client's mistake, not the server's: it gets a JSON 400 and
one info line (aiohttp logs a traceback at error level for each), and is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from sidecar.config import Settings
from sidecar.proxy import json_error
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Guard:
    header_timeout: float
    metrics: Metrics


def _timeout_response(seconds: float) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "type": "request_timeout",
                "message": f"request headers not received within {seconds:g}s",
            }
        }
    )
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol, plus the header deadline and quiet bad-request handling."""

    guard: Guard

    def connection_made(self, transport: Any) -> None:
        self._header_timer: Any = None
        self._body: Any = None  # the payload of the last request parsed
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # The first byte of a request while none is being handled starts its header deadline.
        if data and self._header_timer is None and self._between_requests():
            self._arm()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()
            if self._messages:
                self._body = self._messages[-1][1]

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self.guard.metrics.bad_requests.labels("malformed").inc()
        text = next(iter((message or str(exc)).splitlines()), "")[:200]
        log.info("malformed request from %s: %s", request.remote, text)
        resp = json_error(status, "bad_request", f"malformed request: {text}")
        resp.force_close()
        return resp

    def _between_requests(self) -> bool:
        """No request being parsed, queued, handled, or still receiving its body."""
        body_done = self._body is None or self._body.is_eof()
        return body_done and self._current_request is None and not self._messages

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self._loop.call_later(self.guard.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or not self._between_requests():
            return
        seconds = self.guard.header_timeout
        self.guard.metrics.bad_requests.labels("header_timeout").inc()
        log.info(
            "request headers not received within %gs from %s: closing",
            seconds,
            transport.get_extra_info("peername"),
        )
        transport.write(_timeout_response(seconds))
        self.force_close()


class _GuardedServer(web.Server):
    guard: Guard

    def __call__(self) -> RequestHandler:
        handler = GuardedRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.guard = self.guard
        return handler


class TrafficRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are ``GuardedRequestHandler``s, with the keep-alive
    timeout from the settings."""

    def __init__(
        self, app: web.Application, settings: Settings, metrics: Metrics, **kwargs: Any
    ) -> None:
        super().__init__(app, keepalive_timeout=settings.keepalive_timeout_seconds, **kwargs)
        self._guard = Guard(settings.request_header_timeout_seconds, metrics)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application's Server, handing out guarded protocols: aiohttp has no factory hook.
        server.__class__ = _GuardedServer
        assert isinstance(server, _GuardedServer)
        server.guard = self._guard
        return server
