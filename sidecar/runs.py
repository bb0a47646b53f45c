"""Run meta in Redis, and this process's registry of the runs it is producing.

The meta hash (``sse:run:{<id>}:meta``) is written only through the writer's append script, so it
always agrees with the stored events; this module reads it, renews producer leases, and keeps the
local table that shutdown drains and cancel looks up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.background import Background
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.payload import render_event
from sidecar.terminal import EndCause, Outcome, Tracker
from sidecar.writer import RunStream, Writer, redis_text

log = logging.getLogger(__name__)

# How long one wait for a cancel message lasts (a socket read, not a Redis command).
LISTEN_POLL_SECONDS = 1.0
FINALIZE_SCRIPT = resources.files("sidecar").joinpath("finalize.lua").read_text()

INSTANCE_ID = f"{socket.gethostname()}:{os.getpid()}"


def final_meta(outcome: Outcome) -> dict[str, str]:
    """The meta fields a run's terminal sets."""
    meta = {
        "status": outcome.status.value,
        "finished_ms": str(int(time.time() * 1000)),
        "forced_done": outcome.forced_done.value if outcome.forced_done else "",
        "stop_reason": outcome.stop_reason or "",
    }
    if outcome.error is not None:
        meta["error"] = orjson.dumps(outcome.error).decode()
    return meta


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
    generation: str | None = None  # set when the run started; a reused run id gets a new one

    @classmethod
    def from_hash(cls, run_id: str, raw: dict[Any, Any]) -> RunMeta:
        h = {redis_text(k): redis_text(v) for k, v in raw.items()}

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
            generation=h.get("generation") or None,
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

    @property
    def generation(self) -> str: ...

    def cancel(self, cause: EndCause) -> None: ...

    def wait(self) -> Awaitable[None]: ...


class RunRegistry:
    """Runs this process is producing, and the task that renews their leases."""

    def __init__(self, writer: Writer, lease_seconds: float) -> None:
        self._writer = writer
        self._lease_seconds = lease_seconds
        self._runs: dict[str, ActiveRun] = {}
        self._background = Background("sse-leases", self._renew_leases)

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
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

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


async def end_orphaned_run(
    redis: Redis,
    keys: Keys,
    run_id: RunId,
    cause: EndCause,
    *,
    require_dead: bool,
    ttl_seconds: int,
    fill: bool,
) -> Outcome | None:
    """End a running run that no producer will end (lease expired, or cancelled without one).

    Appends the synthesized terminal for ``cause`` and the final meta in one atomic script, so
    that many readers on many replicas racing here end the run exactly once. Returns the outcome
    when this call ended the run; None when the run had ended already, does not exist, or (with
    ``require_dead``) its producer is still alive.
    """
    for _ in range(10):
        meta = await read_meta(redis, keys, run_id)
        if meta is None or meta.status != "running":
            return None
        tracker = Tracker(
            stop_reason=meta.stop_reason, error=meta.error, saw_error=meta.error is not None
        )
        outcome = tracker.finish(cause)
        now_ms = int(time.time() * 1000)
        args: list[Any] = [new_producer_id(), meta.last_seq, "1" if require_dead else "0"]
        args.append(ttl_seconds * 1000)
        fields = final_meta(outcome)
        args.append(len(fields))
        for key, value in fields.items():
            args += [key, value]
        last = len(outcome.synthesized) - 1
        for i, synth in enumerate(outcome.synthesized):
            seq = meta.last_seq + i + 1
            raw = render_event(
                synth.data, event=synth.event, retry=None, seq=seq, run_id=run_id, fill=fill
            )
            args += [seq, raw, now_ms, "true" if i == last else "false"]
        reply: Any = await redis.eval(
            FINALIZE_SCRIPT, 2, keys.stream(run_id), keys.meta(run_id), *args
        )
        code = int(reply[0])
        if code == 1:
            log.warning(
                "run ended without the upstream's [DONE]: forced %s",
                cause.value,
                extra={
                    "run_id": run_id,
                    "reason": cause.value,
                    "saw_error": outcome.saw_error,
                    "saw_done": outcome.saw_done,
                },
            )
            return outcome
        if code != -2:
            return None
    return None


class CancelListener:
    """Receives cancel requests published by any replica and cancels the runs produced here."""

    def __init__(self, redis: Redis, channel: str, registry: RunRegistry) -> None:
        self._redis = redis
        self._channel = channel
        self._registry = registry
        self._background = Background("sse-cancel-listener", self._loop)
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                backoff = 0.05
                while True:
                    # get_message with a timeout, not listen(): listen() can swallow the
                    # cancellation that stops this task (redis-py 8), hanging shutdown.
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_POLL_SECONDS
                    )
                    if message is not None:
                        self._cancel(redis_text(message.get("data", b"")))
            except (redis_errors.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("cancel subscription lost, resubscribing: %s", exc)
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _cancel(self, raw: str) -> None:
        try:
            run_id = validate_run_id(raw)
        except ValueError:
            return
        run = self._registry.get(run_id)
        if run is not None:
            log.info("cancelling run on request", extra={"run_id": run_id})
            run.cancel(EndCause.CANCELLED)
