"""Small helpers for functional tests: build upstream SSE bytes, read client and Redis views."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio

from sidecar.keys import Keys, RunId
from sidecar.sse import Event, SSEDecoder


def data(payload: Any, event: str | None = None) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def token(text: str) -> bytes:
    return data({"message_type": "assistant_message", "content": text})


def stop(reason: str) -> bytes:
    return data({"message_type": "stop_reason", "stop_reason": reason})


def error(message: str = "model overloaded") -> bytes:
    return data(
        {"message_type": "error_message", "error_type": "llm_error", "message": message}, "error"
    )


DONE = b"data: [DONE]\n\n"


@dataclass
class ClientView:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def run_id(self) -> RunId:
        return RunId(self.headers["X-Sidecar-Run-Id"])

    @property
    def events(self) -> list[Event]:
        return [i for i in SSEDecoder().feed(self.body) if isinstance(i, Event)]


async def stream(
    http: aiohttp.ClientSession, url: str, *, method: str = "POST", **kwargs: Any
) -> ClientView:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.read()
        return ClientView(resp.status, dict(resp.headers), body)


async def stored(
    client: redis.asyncio.Redis, run_id: RunId, prefix: str = "sse:run:"
) -> list[dict[str, str]]:
    """The run's stream entries as dicts (id, seq_id, data, timestamp, complete)."""
    entries: Any = await client.xrange(Keys(prefix).stream(run_id))
    out = []
    for entry_id, fields in entries:
        row = {_s(k): _s(v) for k, v in fields.items()}
        row["id"] = _s(entry_id)
        out.append(row)
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def meta(
    client: redis.asyncio.Redis, run_id: RunId, prefix: str = "sse:run:"
) -> dict[str, str]:
    raw: dict[Any, Any] = await client.hgetall(Keys(prefix).meta(run_id))
    return {_s(k): _s(v) for k, v in raw.items()}


def payloads(events: list[Event]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        try:
            out.append(json.loads(e.data or ""))
        except json.JSONDecodeError:
            out.append(e.data)
    return out
