"""Run meta in Redis, and this process's registry of the runs it is producing.

The meta hash (``sse:run:{<id>}:meta``) is written only through the writer's append script, so it
always agrees with the stored events; this module reads it, renews producer leases, and keeps the
local table that shutdown drains and cancel looks up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis

from sidecar.keys import Keys, RunId
from sidecar.terminal import EndCause
from sidecar.writer import RunStream, Writer

INSTANCE_ID = f"{socket.gethostname()}:{os.getpid()}"


def new_producer_id() -> str:
    """Unique per run attempt, so a run id reused in this process is a different producer."""
    return f"{INSTANCE_ID}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class RunMeta:
    run_id: str
    status: str
    stop_reason: str | None
    error: Any | None
    last_seq: int
    created_ms: int | None
    updated_ms: int | None
    finished_ms: int | None
    producer: str | None
    lease_until_ms: int | None
    forced_done: str | None
    trace_id: str | None
    incomplete: str | None
    trimmed_events: int

    @classmethod
    def from_hash(cls, run_id: str, raw: dict[Any, Any]) -> RunMeta:
        h = {_text(k): _text(v) for k, v in raw.items()}

        def num(key: str) -> int | None:
            value = h.get(key)
            return int(value) if value else None

        error = h.get("error")
        return cls(
            run_id=run_id,
            status=h.get("status", "unknown"),
            stop_reason=h.get("stop_reason") or None,
            error=orjson.loads(error) if error else None,
            last_seq=num("last_seq") or 0,
            created_ms=num("created_ms"),
            updated_ms=num("updated_ms"),
            finished_ms=num("finished_ms"),
            producer=h.get("producer"),
            lease_until_ms=num("lease_until_ms"),
            forced_done=h.get("forced_done") or None,
            trace_id=h.get("trace_id") or None,
            incomplete=h.get("incomplete") or None,
            trimmed_events=num("trimmed_events") or 0,
        )


async def read_meta(redis: Redis, keys: Keys, run_id: RunId) -> RunMeta | None:
    raw = await redis.hgetall(keys.meta(run_id))
    return RunMeta.from_hash(run_id, raw) if raw else None


class ActiveRun(Protocol):
    """What the registry needs of a running tee."""

    @property
    def run_id(self) -> RunId: ...

    @property
    def stream(self) -> RunStream: ...

    def cancel(self, cause: EndCause) -> None: ...

    def wait(self) -> Awaitable[None]: ...


class RunRegistry:
    """Runs this process is producing, and the task that renews their leases."""

    def __init__(self, writer: Writer, lease_seconds: float) -> None:
        self._writer = writer
        self._lease_seconds = lease_seconds
        self._runs: dict[str, ActiveRun] = {}
        self._task: asyncio.Task[None] | None = None

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._runs

    def __iter__(self) -> Iterator[ActiveRun]:
        return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, run_id: str) -> ActiveRun | None:
        return self._runs.get(run_id)

    def add(self, run: ActiveRun) -> None:
        self._runs[run.run_id] = run

    def remove(self, run: ActiveRun) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._renew_leases(), name="sse-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _renew_leases(self) -> None:
        # Three renewals per lease: a run survives two lost round trips before it looks dead.
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            for run in self:
                self._writer.update_meta(run.stream, {})

    async def drain(
        self,
        timeout: float,
        cancel_cause: EndCause,
        on_timeout: Callable[[int], None] | None = None,
    ) -> None:
        """Wait ``timeout`` s for running runs to end, then end the rest with ``cancel_cause``."""
        waiting = [asyncio.ensure_future(run.wait()) for run in self]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            if pending:
                if on_timeout is not None:
                    on_timeout(len(pending))
                for run in self:
                    run.cancel(cancel_cause)
                await asyncio.wait(pending, timeout=5.0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
