"""Reading a request body with a bound on the client's silence.

aiohttp waits for the next body bytes for as long as the client likes; a client that announces a
body and stops sending holds its handler (and, on the proxy route, an upstream request) forever.
Every body the sidecar reads goes through ``body_chunks``, which raises ``BodyTimeout`` when no
byte came for ``idle_seconds`` (the routes answer 408).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.errors import BodyTimeout, RequestTooLarge


async def body_chunks(request: web.Request, idle_seconds: float) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                chunk = await request.content.readany()
        except TimeoutError:
            raise BodyTimeout(idle_seconds) from None
        if not chunk:
            return
        yield chunk


async def read_body(request: web.Request, idle_seconds: float, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (``RequestTooLarge`` past it)."""
    body = bytearray()
    async for chunk in body_chunks(request, idle_seconds):
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(limit)
    return bytes(body)
