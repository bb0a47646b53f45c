"""Small helpers for functional tests: build upstream SSE bytes, read client and Redis views."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.cluster import RedisCluster

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
    client: redis.asyncio.Redis | RedisCluster, run_id: RunId, prefix: str = "sse:run:"
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
    client: redis.asyncio.Redis | RedisCluster, run_id: RunId, prefix: str = "sse:run:"
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


async def read_events(resp: aiohttp.ClientResponse, n: int) -> bytes:
    """Read a live SSE response until at least ``n`` events arrived; returns the bytes read."""
    decoder = SSEDecoder()
    buf = bytearray()
    seen = 0
    while seen < n:
        chunk = await resp.content.readany()
        if not chunk:
            raise AssertionError(f"the stream ended after {seen} of {n} events: {bytes(buf)!r}")
        buf += chunk
        seen += sum(isinstance(item, Event) for item in decoder.feed(chunk))
    return bytes(buf)


def samples(registry: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` in a prometheus registry, keyed by its sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def nonzero(values: dict[tuple[tuple[str, str], ...], float]) -> dict[Any, float]:
    """Samples without the series the sidecar creates at 0 for every known label value."""
    return {labels: value for labels, value in values.items() if value}


def replay_outcomes(registry: Any) -> dict[str, float]:
    """``sse_sidecar_replay_requests_total`` by outcome, only the outcomes that occurred."""
    found = nonzero(samples(registry, "sse_sidecar_replay_requests_total"))
    return {dict(labels)["outcome"]: value for labels, value in found.items()}


# Keys every sidecar keeps whatever its runs: the epoch (data-loss detection) and lease index.
PROCESS_KEYS = frozenset({"sse:run:epoch", "sse:run:leases"})


async def redis_keys(client: redis.asyncio.Redis) -> list[str]:
    """Every key in the test Redis but the sidecar's own process keys, sorted."""
    return sorted(k for k in (_s(k) for k in await client.keys("*")) if k not in PROCESS_KEYS)


# -- appended: polling with a deadline, and reading a live SSE response incrementally ---------


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it returns True; fail after ``timeout`` s (for states with no event)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # polling: the state has no event to await


class LiveReader:
    """Reads an SSE response as it arrives: ``await until(n)`` returns once n events came."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.body = b""
        self.events: list[Event] = []
        self._decoder = SSEDecoder()

    async def until(self, n: int, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.events) < n:
                chunk = await self.resp.content.readany()
                if not chunk:
                    raise AssertionError(f"stream ended after {len(self.events)} of {n} events")
                self._take(chunk)
        return self.events

    async def rest(self, timeout: float = 10.0) -> bytes:
        """Read to the end of the response; the whole body so far."""
        async with asyncio.timeout(timeout):
            while chunk := await self.resp.content.readany():
                self._take(chunk)
        return self.body

    def _take(self, chunk: bytes) -> None:
        self.body += chunk
        self.events.extend(i for i in self._decoder.feed(chunk) if isinstance(i, Event))


# -- appended (replay tests): raw events of a body, reading up to a marker, runs put in Redis --


def split_events(body: bytes) -> list[bytes]:
    """The raw events of a body the sidecar wrote (LF line ends), each with its blank line."""
    parts = body.split(b"\n\n")
    assert parts[-1] == b"", f"the body does not end at an event boundary: {body[-80:]!r}"
    return [part + b"\n\n" for part in parts[:-1]]


async def read_until_bytes(
    reader: LiveReader, needle: bytes, count: int = 1, timeout: float = 5.0
) -> bytes:
    """Read a live response until ``needle`` occurred ``count`` times; the whole body so far."""
    async with asyncio.timeout(timeout):
        while reader.body.count(needle) < count:
            chunk = await reader.resp.content.readany()
            if not chunk:
                raise AssertionError(f"stream ended before {count} x {needle!r}: {reader.body!r}")
            reader._take(chunk)
    return reader.body


async def write_run(
    client: redis.asyncio.Redis,
    run_id: RunId,
    events: list[bytes],
    fields: dict[str, str],
    *,
    complete_last: bool = False,
    prefix: str = "sse:run:",
) -> None:
    """Store a run as the writer does (entries ``<seq>-0``, then the meta hash), bypassing it."""
    keys = Keys(prefix)
    now_ms = int(time.time() * 1000)
    for seq, raw in enumerate(events, 1):
        complete = "true" if complete_last and seq == len(events) else "false"
        await client.xadd(
            keys.stream(run_id),
            {"seq_id": str(seq), "data": raw, "timestamp": str(now_ms), "complete": complete},
            id=f"{seq}-0",
        )
    values = {"last_seq": str(len(events)), **fields}
    await client.hset(keys.meta(run_id), mapping=values)  # type: ignore[arg-type]


# -- appended (dialect / SDK tests): one stored run, checked against the dialect's promises --


@dataclass
class StoredRun:
    meta: dict[str, str]
    rows: list[dict[str, str]]

    @property
    def events(self) -> list[Event]:
        """The stored events, in order (an entry without bytes has none)."""
        out: list[Event] = []
        for row in self.rows:
            out.extend(i for i in SSEDecoder().feed(row["data"].encode()) if isinstance(i, Event))
        return out


async def stored_run(sc: Any, client: redis.asyncio.Redis, run_id: RunId) -> StoredRun:
    """The run once it has ended and the writer has stored everything; its rows are numbered
    1..n without gaps, and exactly the last one is marked complete."""
    await sc.flushed()
    rows = await stored(client, run_id)
    n = len(rows)
    assert [r["seq_id"] for r in rows] == [str(i) for i in range(1, n + 1)]
    assert [r["complete"] for r in rows] == ["false"] * (n - 1) + ["true"]
    m = await meta(client, run_id)
    assert m["last_seq"] == str(n)
    return StoredRun(m, rows)


def forced_total(sc: Any) -> float:
    """Every forced terminal this sidecar counted, whatever its reason and dialect."""
    return float(sc.metric("sse_sidecar_forced_done_total"))


# -- appended (shutdown tests): a value from a scraped /metrics body ----------------------------


def scraped_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` in a Prometheus text body whose labels include
    ``labels`` (so a label added later, such as ``dialect``, does not break the match)."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
                found = True
    assert found, f"no sample {name}{labels} in the scrape"
    return total


# -- appended (dashboards and Prometheus tests): the project's scripts as modules --------------


def import_file(path: Path) -> ModuleType:
    """A Python file that is not in a package (dashboards/, scripts/), imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- appended (hostile clients): raw sockets that send exact bytes and may stop reading --------


async def raw_connect(
    port: int, *, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to 127.0.0.1:port. With ``rcvbuf``, a small kernel receive buffer
    and a small reader buffer: once the test stops reading, the peer's writes back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=rcvbuf or (1 << 16))


def raw_request(
    method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request as bytes (header values latin-1, so any byte can be sent)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes; whether it reset the connection."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(1 << 16)
            except ConnectionResetError:
                return bytes(out), True
            if not chunk:
                return bytes(out), False
            out += chunk


async def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one request on a fresh connection (``Connection: close``); the status and body."""
    reader, writer = await raw_connect(port)
    head, sep, rest = request.partition(b"\r\n")
    writer.write(head + sep + b"Connection: close\r\n" + rest)
    try:
        raw, _ = await read_to_end(reader, timeout)
    finally:
        writer.close()
    status_line, _, remainder = raw.partition(b"\r\n")
    _, _, body = remainder.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


async def stored_count(redis_client: redis.asyncio.Redis, run_id: RunId, n: int) -> None:
    """Until Redis holds at least ``n`` events of the run."""

    async def there() -> bool:
        return len(await stored(redis_client, run_id)) >= n

    await eventually(there, what=f"{n} stored events of {run_id}")
