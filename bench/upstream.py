"""A fast LLM-like upstream for the bench: raw asyncio, HTTP/1.1 keep-alive, chunked SSE.

``python -m bench.upstream --port P`` serves, on any path containing ``stream`` (GET or POST)::

    ?n=N        token events (~150 bytes each, Letta's assistant_message shape), then a
                stop_reason event and [DONE]: N + 2 events in all
    &rate=R     events per second per stream; 0 (the default) sends as fast as the reader takes
    &ids=null   "seq_id": null, "run_id": null (the sidecar fills them: real JSON rewriting);
                ids=filled sends them filled (the sidecar then keeps the bytes as they are)

Every token event carries its send time as ``"t": <µs since the epoch>``, taken just before the
write, so a client computes per-event latency as receive time - t. Paced streams are all driven
by one 1 ms ticker (not one timer per stream), each stream on its own phase, so 1,000 paced
streams cost the upstream little CPU and do not arrive in lockstep. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import time
import uuid
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

from bench.common import (
    DONE_EVENT,
    NULL_IDS,
    STOP_EVENT,
    WORDS,
    now_us,
    raise_nofile,
    token_event,
)

SATURATE_BATCH = 16  # events per transport write when sending as fast as possible
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


LAST_CHUNKS = chunk(STOP_EVENT) + chunk(DONE_EVENT) + b"0\r\n\r\n"


class Stream:
    """One SSE response in progress on a connection."""

    __slots__ = ("conn", "ids", "k", "message_id", "n", "period_ns", "start_ns")

    def __init__(self, conn: Connection, n: int, rate: float, ids: bytes) -> None:
        self.conn = conn
        self.n = n
        self.k = 0
        self.ids = ids
        self.message_id = str(uuid.uuid4()).encode()
        self.period_ns = int(1e9 / rate) if rate > 0 else 0
        self.start_ns = time.monotonic_ns()

    def event(self) -> bytes:
        ids = self.ids if self.ids is NULL_IDS else self.ids % (self.k + 1)
        ev = token_event(self.message_id, WORDS[self.k % len(WORDS)], now_us(), ids)
        self.k += 1
        return chunk(ev)

    def finish(self) -> None:
        self.conn.end_response(LAST_CHUNKS)


class Pacer:
    """One ticker for every paced stream: each tick sends the events that are due."""

    def __init__(self) -> None:
        self._due: dict[int, list[Stream]] = defaultdict(list)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, stream: Stream) -> None:
        # The first event goes out at once, like a model's first token after its latency.
        self._due[time.monotonic_ns() // 1_000_000].append(stream)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
            now = time.monotonic_ns() // 1_000_000
            for tick in sorted(t for t in self._due if t <= now):
                for stream in self._due.pop(tick):
                    conn = stream.conn
                    if conn.closed:
                        continue
                    if stream.k < stream.n:
                        conn.write(stream.event())
                    if stream.k >= stream.n:
                        stream.finish()
                        continue
                    due_ns = stream.start_ns + stream.k * stream.period_ns
                    self._due[max(due_ns // 1_000_000, now + 1)].append(stream)
            await asyncio.sleep(0.0005)


PACER: Pacer | None = None


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.close_after = False
        self._resume: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def pause_writing(self) -> None:
        if self._resume is None:
            self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    # -- HTTP ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def end_response(self, tail: bytes) -> None:
        self.write(tail)
        self.busy = False
        if self.close_after:
            if self.transport is not None:
                self.transport.close()
        elif self.buf:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        _method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        self.busy = True
        self.close_after = headers.get("connection", "").lower() == "close"
        url = urlsplit(target)
        if "stream" not in url.path:
            body = b'{"status":"ok"}'
            self.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            self.end_response(b"")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        n = int(query.get("n", "100"))
        rate = float(query.get("rate", "0"))
        ids = NULL_IDS
        if query.get("ids") == "filled":
            run_id = headers.get("x-run-id", "run-unknown").encode()
            ids = b'"seq_id":%%d,"run_id":"%s"' % run_id
        self.write(RESPONSE_HEAD)
        stream = Stream(self, n, rate, ids)
        if rate > 0:
            global PACER
            if PACER is None:
                PACER = Pacer()
            PACER.add(stream)
        else:
            asyncio.get_running_loop().create_task(self._saturate(stream))

    async def _saturate(self, stream: Stream) -> None:
        while stream.k < stream.n and not self.closed:
            batch = min(SATURATE_BATCH, stream.n - stream.k)
            self.write(b"".join([stream.event() for _ in range(batch)]))
            if self._resume is not None:
                await self._resume
            else:
                await asyncio.sleep(0)
        if not self.closed:
            stream.finish()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(Connection, sock=sock, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
