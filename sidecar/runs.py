"""The runs this process produces: the registry that shutdown drains and cancel looks up, their
lease renewals, the cancel requests of other replicas, and the sweep of orphaned runs.

Leases: each running run's meta holds its producer and a lease deadline (Redis' clock), renewed
every third of a lease through the writer, ahead of any backlog. A run whose lease has expired
may be ended by any process as ``producer_lost``, but only by the sweep, and only when

- the sweeping process is not producing it itself (a process never declares its own run lost),
- the sweeping process has reached Redis without a break for a whole lease (a lease that lapsed
  while Redis was down, frozen or failing over, for everybody, says nothing about its producer:
  after such an outage every live producer renews first thing, well within that lease), and
- Redis agrees, atomically, that the lease has expired (``finalize.lua``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from sidecar.background import Background
from sidecar.ending import Finalizer
from sidecar.errors import StoreError
from sidecar.keys import RunId, validate_run_id
from sidecar.store import FinalizeStatus, RunMeta, RunStore, backoff
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause
from sidecar.writer import RunStream, Writer

log = logging.getLogger(__name__)

# How long one wait for a cancel message lasts (a socket read, not a Redis command).
LISTEN_POLL_SECONDS = 1.0
# Runs the sweep looks at per pass (the rest wait for the next pass).
SWEEP_BATCH = 256

INSTANCE_ID = f"{socket.gethostname()}:{os.getpid()}"


def new_producer_id() -> str:
    """Unique per run attempt, so a run id reused in this process is a different producer."""
    return f"{INSTANCE_ID}:{uuid.uuid4().hex[:12]}"


class ActiveRun(Protocol):
    """What the registry needs of a running tee."""

    @property
    def run_id(self) -> RunId: ...

    @property
    def stream(self) -> RunStream: ...

    @property
    def generation(self) -> str: ...

    def cancel(self, cause: EndCause) -> None: ...

    def keepalive(self, now: float, interval: float) -> None: ...

    def wait(self) -> Awaitable[None]: ...


class RunRegistry:
    """Runs this process is producing, the task that renews their leases, and the one that keeps
    their idle clients' connections alive (one timer for every run, not one per read)."""

    def __init__(
        self,
        writer: Writer,
        lease_seconds: float,
        metrics: Metrics,
        *,
        keepalive_seconds: float,
        read_timeout_seconds: float | None = None,
    ) -> None:
        self._writer = writer
        self._lease_seconds = lease_seconds
        self._keepalive_seconds = keepalive_seconds
        # The same sweep enforces the upstream read timeout (Tee.keepalive): often enough that
        # a run ends within a quarter of that timeout after it.
        self._tick = min(1.0, keepalive_seconds / 2, (read_timeout_seconds or 4.0) / 4)
        self._runs: dict[str, ActiveRun] = {}
        self._background = Background("sse-leases", self._renew_leases, metrics)
        self._keepalives = Background("sse-keepalive", self._keep_alive, metrics)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._runs

    def __iter__(self) -> Iterator[ActiveRun]:
        return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, run_id: str) -> ActiveRun | None:
        return self._runs.get(run_id)

    def meta(self, run_id: RunId) -> RunMeta | None:
        """The meta of a run produced here, as it started: a run is known to its own process
        before Redis has its claim (the first byte does not wait for it)."""
        run = self._runs.get(run_id)
        if run is None:
            return None
        return RunMeta.from_hash(run_id, {**run.stream.initial, "last_seq": "0"})

    def add(self, run: ActiveRun) -> None:
        self._runs[run.run_id] = run

    def remove(self, run: ActiveRun) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]

    def start(self) -> None:
        self._background.start()
        self._keepalives.start()

    async def stop(self) -> None:
        await self._keepalives.stop()
        await self._background.stop()

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for run in self:
                run.keepalive(now, self._keepalive_seconds)

    def renew_all(self, *, resend_initial: bool = False) -> None:
        self._writer.renew((run.stream for run in self), resend_initial=resend_initial)

    async def _renew_leases(self) -> None:
        # Three renewals per lease: a run survives two lost round trips before it looks dead.
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            self.renew_all()

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


class OrphanSweep:
    """Ends, as ``producer_lost``, the runs whose producer stopped renewing its lease.

    Reads the lease index (one command per pass, whatever the number of runs), so an orphaned
    run is counted and ended without anybody reading it: within about a lease plus one pass.
    """

    def __init__(
        self,
        store: RunStore,
        registry: RunRegistry,
        finalizer: Finalizer,
        metrics: Metrics,
        *,
        lease_seconds: float,
    ) -> None:
        self._store = store
        self._registry = registry
        self._finalizer = finalizer
        self._lease_seconds = lease_seconds
        self._m = metrics
        self._background = Background("sse-orphan-sweep", self._loop, metrics)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            try:
                await self.sweep()
            except StoreError as exc:
                self._m.redis_errors.labels("sweep").inc()
                log.warning("orphan sweep failed, trying again next pass: %s", exc)

    async def sweep(self) -> int:
        """One pass; how many runs it ended."""
        if self._store.health.up_for() < self._lease_seconds:
            return 0
        candidates = await self._store.expired_leases(int(time.time() * 1000), SWEEP_BATCH)
        forget: list[RunId] = []
        ended = 0
        for run_id in candidates:
            if run_id in self._registry:
                continue  # ours: our writer renews it as soon as it can
            status = await self._finalizer.end(run_id, EndCause.PRODUCER_LOST, require_dead=True)
            if status is FinalizeStatus.ENDED:
                ended += 1
            if status is not FinalizeStatus.ALIVE:
                forget.append(run_id)
        await self._store.forget_leases(forget)
        return ended


class CancelListener:
    """Receives cancel requests published by any replica and cancels the runs produced here."""

    def __init__(self, store: RunStore, registry: RunRegistry, metrics: Metrics) -> None:
        self._store = store
        self._registry = registry
        self._m = metrics
        self._background = Background("sse-cancel-listener", self._loop, metrics)
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        retry = backoff(0.05, 2.0)
        failures = 0
        while True:
            try:
                async with self._store.cancel_requests() as requests:
                    self.subscribed.set()
                    failures = 0
                    while True:
                        run_id = await requests.next(LISTEN_POLL_SECONDS)
                        if run_id is not None:
                            self._cancel(run_id)
            except StoreError as exc:
                self.subscribed.clear()
                failures += 1
                self._m.redis_errors.labels("cancel").inc()
                log.warning("cancel subscription lost, resubscribing: %s", exc)
                await asyncio.sleep(retry(failures))

    def _cancel(self, raw: str) -> None:
        try:
            run_id = validate_run_id(raw)
        except ValueError:
            return
        run = self._registry.get(run_id)
        if run is not None:
            log.info("cancelling run on request", extra={"run_id": run_id})
            run.cancel(EndCause.CANCELLED)
