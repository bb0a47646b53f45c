"""Is Redis reachable from here? One PING every few seconds, exported as ``sse_sidecar_redis_up``.

The writer's flush errors only say so when there is something to write, and a busy process's
successful flushes before an outage dilute them: an idle replica exports nothing at all. This
probe answers the question on every replica, busy or idle, at the cost of one PING per
``interval``. It has a connection of its own, so a pool saturated by readers does not pass for an
unreachable Redis.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.background import Background

log = logging.getLogger(__name__)


class RedisProbe:
    def __init__(self, redis_url: str, gauge: Gauge, *, interval: float, timeout: float) -> None:
        self._client = Redis.from_url(
            redis_url,
            single_connection_client=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._gauge = gauge
        self._interval = interval
        self._timeout = timeout
        self._up: bool | None = None
        self._background = Background("sse-redis-probe", self._loop)

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        await self._client.aclose()

    async def check(self) -> bool:
        """One PING within the timeout; the gauge follows the answer."""
        try:
            await asyncio.wait_for(self._client.ping(), self._timeout)
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            if self._up is not False:  # log the change, not every failed probe
                log.warning("redis unreachable: %s", exc or type(exc).__name__)
            self._set(False)
            return False
        if self._up is False:
            log.info("redis reachable again")
        self._set(True)
        return True

    def _set(self, up: bool) -> None:
        self._up = up
        self._gauge.set(1 if up else 0)

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)  # a periodic probe: the interval is the point
