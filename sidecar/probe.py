"""The Redis probe: every few seconds, does Redis answer, and does it still hold its data?

It keeps ``sse_sidecar_redis_up`` true for idle replicas too (every other command also feeds the
store's health), and it is how a sidecar learns that Redis lost its data (restarted without
persistence, was flushed, or failed over to an empty replica) while its runs are quiet: the
running runs are then written again at once (their meta rebuilt, marked ``history_lost``), and
the readers of runs that vanished are told instead of waiting for entries that will never come.
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.background import Background
from sidecar.errors import StoreError
from sidecar.follow import Follower
from sidecar.runs import RunRegistry
from sidecar.store import RunStore
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)


class RedisProbe:
    def __init__(
        self,
        store: RunStore,
        registry: RunRegistry,
        follower: Follower,
        metrics: Metrics,
        *,
        interval: float,
    ) -> None:
        self._store = store
        self._registry = registry
        self._follower = follower
        self._m = metrics
        self._interval = interval
        self._background = Background("sse-redis-probe", self._loop, metrics)
        metrics.redis_up.set_function(lambda: 1 if store.health.up else 0)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)

    async def probe(self) -> bool:
        """One probe (and its reaction to lost data); whether Redis answered."""
        try:
            lost = await self._store.probe()
            if lost:
                self._m.redis_data_lost.inc()
                log.error(
                    "Redis lost its data (restarted empty, flushed, or failed over to an empty "
                    "replica): %d running runs are written again from here on; readers of runs "
                    "that vanished are told",
                    len(self._registry),
                    extra={"reason": "history_lost"},
                )
                self._registry.renew_all(resend_initial=True)
                await self._follower.check_runs()
        except StoreError as exc:
            self._m.redis_errors.labels("probe").inc()
            log.debug("Redis probe failed: %s", exc)
            return False
        return True
