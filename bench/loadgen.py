"""The load generator: SSE clients on raw asyncio sockets, driven by line-JSON commands.

Run as ``python -m bench.loadgen`` by the driver, in its own process so that its CPU is not the
sidecar's. Clients speak HTTP/1.1 themselves (one connection per stream, chunked bodies decoded
by hand): a client library would cost more CPU than the proxy it measures. Each token event
carries the upstream's send time (µs); a client stamps every read with the time before
parsing it, so latency = that stamp - the event's send time, in microseconds.

Besides clients, two commands drive the sidecar's writer in-process (``writer_alone``, the
sidecar's counterpart of Letta's writer alone; ``make_runs``, running runs to follow while idle):
they import ``sidecar``, so this module runs in the project's virtualenv.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from typing import Any

from bench.common import (
    T_FIELD,
    ChunkedDecoder,
    Clock,
    Handler,
    distribution,
    now_us,
    parse_head,
    run_worker,
)


class SSEClient(asyncio.Protocol):
    """One streamed request: counts events, and records per-event latency when asked."""

    def __init__(
        self,
        request: bytes,
        latencies: array[int] | None,
        *,
        measure_after_us: int = 0,
    ) -> None:
        self._request = request
        self._lat = latencies
        self._after = measure_after_us
        self._head = bytearray()
        self._decoder: ChunkedDecoder | None = None
        self._pending = b""
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers_at_us = 0  # when the response head came in
        self.events = 0
        self.pings = 0
        self.error: str | None = None
        self.headers_seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_event: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set_measure_after(self, t_us: int) -> None:
        self._after = t_us

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = now_us()
        if self._decoder is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status, headers = parse_head(bytes(self._head[:end]))
            data = bytes(self._head[end + 4 :])
            self._head.clear()
            self._decoder = ChunkedDecoder()
            self.headers_at_us = now
            if not self.headers_seen.done():
                self.headers_seen.set_result(None)
            if self.status != 200 or headers.get("transfer-encoding", "").lower() != "chunked":
                self._finish(f"http_{self.status}")
                return
        body = self._decoder.feed(data)
        if body:
            text = self._pending + body
            cut = text.rfind(b"\n\n")
            if cut >= 0:
                complete = text[: cut + 2]
                self._pending = text[cut + 2 :]
                blocks = complete.count(b"\n\n")
                pings = complete.count(b": ping")
                self.events += blocks - pings
                self.pings += pings
                if self.events and not self.first_event.done():
                    self.first_event.set_result(None)
                lat = self._lat
                if lat is not None:
                    after = self._after
                    for m in T_FIELD.finditer(complete):
                        t = int(m.group(1))
                        if t > after:
                            lat.append(now - t)
            else:
                self._pending = text
        if self._decoder.done:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._finish(f"cut: {type(exc).__name__}" if exc else "cut")

    def _finish(self, error: str | None) -> None:
        self.error = error
        for fut in (self.headers_seen, self.first_event, self.done):
            if not fut.done():
                fut.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if not self.done.done():
            self._finish("closed")


def http_request(method: str, path: str, port: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_client(port: int, request: bytes, client: SSEClient) -> SSEClient:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
    except OSError as exc:
        client._finish(f"connect: {type(exc).__name__}")
    return client


async def ramp(count: int, seconds: float, make: Any) -> list[SSEClient]:
    """Start ``count`` clients spread evenly over ``seconds``."""
    tasks: list[asyncio.Task[SSEClient]] = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + seconds * i / max(count, 1) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(make(i)))
    return list(await asyncio.gather(*tasks))


def all_open_s(clients: list[SSEClient], t0_us: int) -> float:
    """Seconds from the first connect until every stream had its response head: past the
    measuring lead, the window did not see every stream open (a slow accept staggers them)."""
    return max((c.headers_at_us - t0_us for c in clients if c.headers_at_us), default=0) / 1e6


def errors_of(clients: list[SSEClient]) -> dict[str, int]:
    return dict(Counter(c.error for c in clients if c.error))


async def wait_all(clients: list[SSEClient], timeout: float) -> None:
    pending = [c.done for c in clients if not c.done.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for c in clients:
        if not c.done.done():
            c.close()
            c.error = "timeout"


# -- commands ----------------------------------------------------------------------------------


async def streams(
    *,
    port: int,
    path: str,
    count: int,
    n: int,
    rate: float,
    ids: str = "null",
    ramp_s: float = 0.0,
    measure_after_s: float = 0.0,
    run_prefix: str = "",
    measure: bool = True,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """``count`` concurrent streams of ``n`` token events at ``rate``/s (0: as fast as possible).

    Streams start evenly over ``ramp_s``; latency is recorded for the events sent
    ``measure_after_s`` or more after the first stream started (the steady state, once all are
    open).
    """
    lat: array[int] | None = array("q") if measure else None
    sep = "&" if "?" in path else "?"
    target = f"{path}{sep}n={n}&rate={rate}&ids={ids}"
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream_tokens":true}'
    after = now_us() + int(measure_after_s * 1e6)

    starts = [0] * count

    async def make(i: int) -> SSEClient:
        headers = {"Content-Type": "application/json"}
        if run_prefix:
            headers["X-Run-Id"] = f"{run_prefix}-{i}"
        request = http_request("POST", target, port, headers, body)
        client = SSEClient(request, lat, measure_after_us=after)
        starts[i] = now_us()
        return await open_client(port, request, client)

    t0 = now_us()
    clock = Clock().start()
    clients = await ramp(count, ramp_s, make)
    await wait_all(clients, timeout_s)
    # Connect and request -> response head in, per stream that got one.
    heads = zip(clients, starts, strict=True)
    first_byte = array("q", (c.headers_at_us - t for c, t in heads if c.headers_at_us))
    elapsed = clock.elapsed()
    events = sum(c.events for c in clients)
    expected = count * (n + 2)
    return {
        "streams": count,
        "all_open_s": all_open_s(clients, t0),
        "complete": sum(1 for c in clients if c.error is None and c.events == n + 2),
        "errors": errors_of(clients),
        "events": events,
        "expected_events": expected,
        "latency_us": distribution(lat) if lat is not None else None,
        "first_byte_us": distribution(first_byte),
        "events_per_s": events / elapsed["wall_s"] if elapsed["wall_s"] else 0.0,
        **elapsed,
    }


async def streams_with_readers(
    *,
    port: int,
    path: str,
    count: int,
    n: int,
    rate: float,
    ramp_s: float,
    measure_after_s: float,
    run_prefix: str,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """The fault suite's load shape: ``count`` streams at ``rate``, each followed live by one
    replay reader that connects as soon as its run's first event arrived.

    Measured for the events sent ``measure_after_s`` or more after the first stream started:
    the live latency (as ``streams``), the replay readers' lag (upstream send -> reader
    receive), and for every stream its first byte (request written -> response headers in).
    """
    live: array[int] = array("q")
    replay: array[int] = array("q")
    first_byte: array[int] = array("q")
    sep = "&" if "?" in path else "?"
    target = f"{path}{sep}n={n}&rate={rate}&ids=null"
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream_tokens":true}'
    after = now_us() + int(measure_after_s * 1e6)
    readers: list[SSEClient] = []

    async def make(i: int) -> SSEClient:
        run_id = f"{run_prefix}-{i}"
        headers = {"Content-Type": "application/json", "X-Run-Id": run_id}
        request = http_request("POST", target, port, headers, body)
        client = SSEClient(request, live, measure_after_us=after)
        t0 = now_us()
        await open_client(port, request, client)
        await client.headers_seen
        first_byte.append(now_us() - t0)
        await client.first_event
        if client.error is None:
            get = http_request("GET", f"/sidecar/v1/runs/{run_id}/stream", port, {}, b"")
            reader = SSEClient(get, replay, measure_after_us=after)
            readers.append(reader)
            await open_client(port, get, reader)
        return client

    t0 = now_us()
    clock = Clock().start()
    clients = await ramp(count, ramp_s, make)
    await wait_all(clients, timeout_s)
    await wait_all(readers, 30)
    elapsed = clock.elapsed()
    events = sum(c.events for c in clients)
    return {
        "streams": count,
        "all_open_s": all_open_s(clients, t0),
        "complete": sum(1 for c in clients if c.error is None and c.events == n + 2),
        "errors": errors_of(clients),
        "events": events,
        "expected_events": count * (n + 2),
        "readers": len(readers),
        "readers_complete": sum(1 for r in readers if r.error is None),
        "reader_errors": errors_of(readers),
        "reader_events": sum(r.events for r in readers),
        "latency_us": distribution(live),
        "replay_lag_us": distribution(replay),
        "first_byte_us": distribution(first_byte),
        "events_per_s": events / elapsed["wall_s"] if elapsed["wall_s"] else 0.0,
        **elapsed,
    }


async def replay_lag(
    *,
    port: int,
    path: str,
    run_id: str,
    readers: int,
    rate: float,
    ramp_s: float,
    window_s: float,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """One run produced through the sidecar at ``rate``, followed live by ``readers`` readers.

    Readers connect once the run has started and catch up; the lag (receive time at the reader -
    the upstream's send time) of the events sent during the ``window_s`` after all of them are
    connected is recorded. Then the run is ended through the sidecar's cancel API (its
    ``cancelled`` terminal and [DONE] end every reader's stream).
    """
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream_tokens":true}'
    target = f"{path}?n={int(rate * 600)}&rate={rate}"
    request = http_request(
        "POST", target, port, {"X-Run-Id": run_id, "Content-Type": "application/json"}, body
    )
    producer = await open_client(port, request, SSEClient(request, None))
    await asyncio.wait_for(producer.first_event, 30)
    lat: array[int] = array("q")
    never = 2**62  # measure nothing until every reader is connected
    get = http_request("GET", f"/sidecar/v1/runs/{run_id}/stream", port, {}, b"")

    async def make(i: int) -> SSEClient:
        return await open_client(port, get, SSEClient(get, lat, measure_after_us=never))

    clock = Clock().start()
    clients = await ramp(readers, ramp_s, make)
    await asyncio.wait([c.first_event for c in clients], timeout=30)
    connected_s = clock.elapsed()["wall_s"]
    mark = now_us() + 100_000
    for c in clients:
        c.set_measure_after(mark)
    await asyncio.sleep(0.1 + window_s)
    lat_window = distribution(lat)  # what came in the window; the cancel's events excluded
    cancel = http_request("POST", f"/sidecar/v1/runs/{run_id}/cancel", port, {}, b"")
    canceller = SSEClient(cancel, None)
    await open_client(port, cancel, canceller)
    await wait_all([producer, *clients], timeout_s)
    return {
        "readers": readers,
        "connect_s": connected_s,
        "producer_events": producer.events,
        "producer_error": producer.error,
        "cancel_status": canceller.status,
        "complete_readers": sum(1 for c in clients if c.error is None),
        "errors": errors_of(clients),
        "lag_us": lat_window,
        **clock.elapsed(),
    }


async def catchup(
    *, port: int, run_id: str, events: int, repeats: int, batch_size: int | None = None
) -> dict[str, Any]:
    """Read a finished run from the start, ``repeats`` times one after the other."""
    query = f"?batch_size={batch_size}" if batch_size else ""
    get = http_request("GET", f"/sidecar/v1/runs/{run_id}/stream{query}", port, {}, b"")
    rates: list[float] = []
    counts: list[int] = []
    errors: list[str] = []
    for _ in range(repeats):
        start = time.perf_counter()
        client = await open_client(port, get, SSEClient(get, None))
        await wait_all([client], 60)
        wall = time.perf_counter() - start
        counts.append(client.events)
        if client.error or client.events != events:
            errors.append(client.error or f"got {client.events} of {events} events")
        rates.append(client.events / wall)
    return {"events_per_s": rates, "events": counts, "errors": errors}


OPEN: list[SSEClient] = []


async def open_readers(
    *, port: int, run_ids: list[str], per_run: int, ramp_s: float, include_pings: bool = False
) -> dict[str, Any]:
    """Open ``per_run`` readers on each run and leave them connected (see ``close_readers``)."""
    query = "?include_pings=true" if include_pings else ""
    targets = [rid for rid in run_ids for _ in range(per_run)]

    async def make(i: int) -> SSEClient:
        get = http_request("GET", f"/sidecar/v1/runs/{targets[i]}/stream{query}", port, {}, b"")
        return await open_client(port, get, SSEClient(get, None))

    clock = Clock().start()
    clients = await ramp(len(targets), ramp_s, make)
    await asyncio.wait([c.headers_seen for c in clients], timeout=60)
    # The first (only) stored event of each run arrives right after the headers.
    await asyncio.wait([c.first_event for c in clients], timeout=30)
    OPEN.extend(clients)
    return {
        "opened": len(clients),
        "streaming": sum(1 for c in clients if c.status == 200 and not c.done.done()),
        "errors": errors_of(clients),
        **clock.elapsed(),
    }


async def close_readers() -> dict[str, Any]:
    clients = list(OPEN)
    OPEN.clear()
    alive = sum(1 for c in clients if not c.done.done())
    result = {
        "alive_at_close": alive,
        "errors_before_close": errors_of(clients),
        "pings": sum(c.pings for c in clients),
    }
    for c in clients:
        c.close()
    await asyncio.sleep(0.2)
    return result


# -- the sidecar's writer, in-process ----------------------------------------------------------


async def writer_alone(*, redis_url: str, runs: int, n: int, prefix: str) -> dict[str, Any]:
    """The sidecar's group-commit writer fed directly (no HTTP, no parsing): its own ceiling.

    ``runs`` runs append ``n`` pre-rendered ~150-byte events each, 16 at a time (as one upstream
    read would bring), yielding to the loop between batches and waiting while more than two
    round trips' worth of events are buffered (the writer would otherwise just queue).
    """
    from bench.common import NULL_IDS, WORDS, token_event
    from sidecar.keys import Keys, RunId
    from sidecar.store import RunStore
    from sidecar.telemetry import Metrics
    from sidecar.writer import Writer

    store = RunStore(redis_url, Keys())
    metrics = Metrics()
    writer = Writer(store, metrics)
    writer.start()
    try:
        streams_ = [
            writer.open(RunId(f"{prefix}-{i}"), f"bench-{i}", {"status": "running"})
            for i in range(runs)
        ]
        await writer.flush(60)
        limit = 2 * 512

        async def produce(i: int) -> None:
            stream = streams_[i]
            mid = f"{i:08d}-0000-0000-0000-000000000000".encode()
            seq = 0
            while seq < n:
                for _ in range(min(16, n - seq)):
                    seq += 1
                    raw = token_event(mid, WORDS[seq % len(WORDS)], now_us(), NULL_IDS)
                    meta = {"status": "completed"} if seq == n else None
                    writer.append(stream, seq, raw, complete=seq == n, meta=meta)
                await asyncio.sleep(0)
                while writer.pending_events > limit:  # noqa: ASYNC110 - the writer has no event
                    await asyncio.sleep(0.0005)

        flushes0 = _counter(metrics, "sse_sidecar_flushes_total", {"outcome": "ok"})
        clock = Clock().start()
        await asyncio.gather(*(produce(i) for i in range(runs)))
        await writer.flush(60)
        elapsed = clock.elapsed()
        flushes = _counter(metrics, "sse_sidecar_flushes_total", {"outcome": "ok"}) - flushes0
        stored = sum([await store.length(s.run_id) for s in streams_])
        return {
            "events": runs * n,
            "stored": stored,
            "round_trips": flushes,
            "events_per_s": runs * n / elapsed["wall_s"],
            "events_per_cpu_s": runs * n / elapsed["cpu_s"] if elapsed["cpu_s"] else 0.0,
            **elapsed,
        }
    finally:
        await writer.close(10)
        await store.aclose()


def _counter(metrics: Any, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def make_runs(*, redis_url: str, run_ids: list[str], lease_s: float) -> dict[str, Any]:
    """Running runs with one event each and a long lease: produced "elsewhere", to follow idle."""
    from bench.common import NULL_IDS, token_event
    from sidecar.keys import Keys, RunId
    from sidecar.store import RunStore
    from sidecar.telemetry import Metrics
    from sidecar.writer import Writer

    store = RunStore(redis_url, Keys())
    writer = Writer(store, Metrics(), lease_seconds=lease_s)
    writer.start()
    try:
        streams_ = [
            writer.open(RunId(rid), f"bench-{rid}", {"status": "running"}) for rid in run_ids
        ]
        for stream in streams_:
            writer.append(stream, 1, token_event(b"idle", b"hello", now_us(), NULL_IDS))
        ok = await writer.flush(60)
        return {"runs": len(run_ids), "flushed": ok}
    finally:
        await writer.close(10)
        await store.aclose()


HANDLERS: dict[str, Handler] = {
    "streams": streams,
    "streams_with_readers": streams_with_readers,
    "replay_lag": replay_lag,
    "catchup": catchup,
    "open_readers": open_readers,
    "close_readers": close_readers,
    "writer_alone": writer_alone,
    "make_runs": make_runs,
}

if __name__ == "__main__":
    run_worker(HANDLERS)
