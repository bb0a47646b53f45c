"""Letta's in-process Redis writer and reader, as the bench's peer; line-JSON commands.

Runs with ``bench/.venv-letta/bin/python -m bench.letta_peer`` (``letta`` 0.16.x from PyPI, in
its own virtualenv). It drives Letta's own code, unchanged:

- writer: ``create_background_stream_processor`` (``letta.server.rest_api.redis_stream_manager``),
  which is how Letta's streaming service tees a run into Redis: one ``RedisSSEStreamWriter`` per
  run with its defaults (flush every 50 chunks or 0.5 s), over the process's
  ``AsyncRedisClient`` built as ``get_redis_client()`` builds it (host, port, defaults: a
  50-connection pool).
- reader: ``redis_sse_stream_generator`` with its defaults (XRANGE pages of 100, a 0.1 s poll),
  which is what Letta serves both the live client and a resuming client from.

The chunks fed to the writer are the bench's ~150-byte token events as ``data: ...`` strings:
exactly the workload the sidecar gets from the bench upstream, minus HTTP (so "writer alone").
Nothing of Letta is stubbed: its missing optional dependency (asyncpg, imported by its ORM) is
installed in the virtualenv instead. Its logs (stdout in Letta's config) go to stderr.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from bench.common import (
    DONE_EVENT,
    NULL_IDS,
    STOP_EVENT,
    WORDS,
    Clock,
    Handler,
    distribution,
    now_us,
    protocol_stdout,
    run_worker,
    token_event,
)

OUT = protocol_stdout()  # before letta is imported: its console log handler binds sys.stdout

from letta.data_sources.redis_client import (  # type: ignore[import-not-found]  # noqa: E402
    AsyncRedisClient,
)
from letta.server.rest_api.redis_stream_manager import (  # type: ignore[import-not-found]  # noqa: E402
    RedisSSEStreamWriter,
    create_background_stream_processor,
    redis_sse_stream_generator,
)

T_TEXT = re.compile(r'"t":(\d+)')
STOP = STOP_EVENT.decode()
DONE = DONE_EVENT.decode()


def letta_version() -> str:
    from importlib.metadata import version

    return version("letta")


def new_client(port: int) -> Any:
    """What ``letta.data_sources.redis_client.get_redis_client()`` builds, on our Redis."""
    return AsyncRedisClient(host="127.0.0.1", port=port)


async def agent_stream(
    n: int, rate: float, stop: asyncio.Event | None = None
) -> AsyncIterator[str]:
    """The agent loop's SSE output: ``n`` token chunks (``rate``/s, 0: at once), stop, [DONE].

    ``stop`` set: the stream ends (stop_reason, [DONE]) before its next chunk.
    """
    message_id = str(uuid.uuid4()).encode()
    period = 1 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    for k in range(n):
        if stop is not None and stop.is_set():
            break
        if period:
            delay = start + k * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield token_event(message_id, WORDS[k % len(WORDS)], now_us(), NULL_IDS).decode()
    yield STOP
    yield DONE


async def _produce(
    client: Any, run_ids: list[str], n: int, rate: float, stop: asyncio.Event | None = None
) -> dict[str, Any]:
    clock = Clock().start()
    results = await asyncio.gather(
        *(
            create_background_stream_processor(agent_stream(n, rate, stop), client, rid)
            for rid in run_ids
        ),
        return_exceptions=True,
    )
    errors = Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    return {"runs": len(run_ids), "chunks": len(run_ids) * (n + 2), "errors": dict(errors)} | (
        clock.elapsed()
    )


async def writer(*, port: int, run_ids: list[str], n: int, rate: float = 0.0) -> dict[str, Any]:
    """Every run of ``run_ids`` produced concurrently through Letta's background processor."""
    client = new_client(port)
    try:
        result = await _produce(client, run_ids, n, rate)
    finally:
        await client.close()
    result["chunks_per_s"] = result["chunks"] / result["wall_s"]
    result["chunks_per_cpu_s"] = result["chunks"] / result["cpu_s"] if result["cpu_s"] else 0.0
    return result


async def _read(
    client: Any, run_id: str, lat: list[int] | None, after: list[int], counts: list[int]
) -> None:
    got = 0
    try:
        async for data in redis_sse_stream_generator(client, run_id):
            now = now_us()
            got += 1
            if lat is not None:
                for m in T_TEXT.finditer(data):
                    t = int(m.group(1))
                    if t > after[0]:
                        lat.append(now - t)
    finally:
        counts.append(got)


async def lag(
    *, port: int, run_id: str, readers: int, rate: float, ramp_s: float, window_s: float
) -> dict[str, Any]:
    """One run produced at ``rate``, followed by ``readers`` Letta readers in this process.

    The lag of the chunks sent during ``window_s`` after every reader started is recorded; then
    the producer ends the run (stop_reason, [DONE]) and the readers get 5 s to see its end.
    """
    client = new_client(port)
    lat: list[int] = []
    after = [2**62]
    counts: list[int] = []
    stop = asyncio.Event()
    try:
        producer = asyncio.create_task(_produce(client, [run_id], int(rate * 600), rate, stop))
        await asyncio.sleep(0.2)  # the run exists (its first chunk is flushed at once)
        clock = Clock().start()
        tasks = []
        for i in range(readers):
            delay = clock.wall0 + ramp_s * i / readers - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_read(client, run_id, lat, after, counts)))
        await asyncio.sleep(0.1)
        connected_s = clock.elapsed()["wall_s"]
        after[0] = now_us() + 100_000
        await asyncio.sleep(0.1 + window_s)
        lat_window = distribution(lat)
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=5)
        for t in pending:
            t.cancel()
        produced = await asyncio.wait_for(producer, 30)
    finally:
        await client.close()
    errors = _task_errors(list(done))
    if pending:
        errors["never saw the end (5 s)"] = len(pending)
    return {
        "readers": readers,
        "connect_s": connected_s,
        "producer_errors": produced["errors"],
        "complete_readers": sum(1 for t in done if t.exception() is None),
        "errors": errors,
        "lag_us": lat_window,
        **clock.elapsed(),
    }


async def catchup(*, port: int, run_id: str, n: int, repeats: int) -> dict[str, Any]:
    """Write one finished run of ``n`` + 2 chunks, then read it whole ``repeats`` times."""
    client = new_client(port)
    try:
        await _produce(client, [run_id], n, 0.0)
        rates: list[float] = []
        counts: list[int] = []
        for _ in range(repeats):
            got: list[int] = []
            start = time.perf_counter()
            await _read(client, run_id, None, [0], got)
            wall = time.perf_counter() - start
            counts.append(got[0])
            rates.append(got[0] / wall)
    finally:
        await client.close()
    return {"events_per_s": rates, "events": counts}


async def make_runs(*, port: int, run_ids: list[str]) -> dict[str, Any]:
    """Running runs with one chunk each (no [DONE]): what idle readers follow."""
    client = new_client(port)
    w = RedisSSEStreamWriter(client)
    try:
        for rid in run_ids:
            await w.write_chunk(rid, token_event(b"idle", b"hello", now_us(), NULL_IDS).decode())
    finally:
        await client.close()
    return {"runs": len(run_ids)}


IDLE: dict[str, Any] = {}


async def open_readers(
    *, port: int, run_ids: list[str], per_run: int, ramp_s: float
) -> dict[str, Any]:
    """``per_run`` idle Letta readers on each run, left running (see ``close_readers``)."""
    client = new_client(port)
    counts: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    clock = Clock().start()
    targets = [rid for rid in run_ids for _ in range(per_run)]
    for i, rid in enumerate(targets):
        delay = clock.wall0 + ramp_s * i / len(targets) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_read(client, rid, None, [0], counts)))
    await asyncio.sleep(0.3)
    IDLE.update(client=client, tasks=tasks)
    failed = [t for t in tasks if t.done()]
    return {
        "opened": len(tasks),
        "failed": len(failed),
        "errors": _task_errors(failed),
        **clock.elapsed(),
    }


def _task_errors(tasks: list[asyncio.Task[None]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for t in tasks:
        if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
            out[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
    return dict(out)


async def close_readers() -> dict[str, Any]:
    tasks: list[asyncio.Task[None]] = IDLE.pop("tasks", [])
    failed = [t for t in tasks if t.done()]
    result = {"alive_at_close": len(tasks) - len(failed), "errors": _task_errors(failed)}
    for t in tasks:
        t.cancel()
    # Bounded: a reader blocked in Letta's generator may not take its cancellation at once (a
    # plain gather here hung the whole bench run).
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=10)
        result["stuck_at_close"] = len(stuck)
    if (client := IDLE.pop("client", None)) is not None:
        await client.close()
    return result


async def info() -> dict[str, Any]:
    return {"letta": letta_version(), "pid": os.getpid()}


HANDLERS: dict[str, Handler] = {
    "writer": writer,
    "lag": lag,
    "catchup": catchup,
    "make_runs": make_runs,
    "open_readers": open_readers,
    "close_readers": close_readers,
    "info": info,
}

if __name__ == "__main__":
    run_worker(HANDLERS, OUT)
