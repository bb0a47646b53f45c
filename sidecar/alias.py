"""Find a run by the id its protocol gave it (``chatcmpl-...``, ``resp_...``, ``msg_...``).

The whole Redis side is ``record_alias`` and ``resolve_alias``: one string key per protocol id,
``<prefix>alias:{<protocol id>}`` → run id, with the run's TTL. ``Aliases`` records them off the
tee's path: the tee never waits on Redis, and a lost alias write only loses the lookup by that id
(the run is still found by its run id).
"""

from __future__ import annotations

import asyncio
import logging

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.errors import InvalidRunId
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)


async def record_alias(
    redis: Redis, keys: Keys, protocol_id: RunId, run_id: RunId, ttl_seconds: int
) -> None:
    await redis.set(keys.alias(protocol_id), run_id, ex=ttl_seconds)


async def resolve_alias(redis: Redis, keys: Keys, protocol_id: RunId) -> RunId | None:
    raw = await redis.get(keys.alias(protocol_id))
    if raw is None:
        return None
    try:
        return validate_run_id(raw.decode() if isinstance(raw, bytes) else str(raw))
    except InvalidRunId:
        return None


class Aliases:
    """Records aliases in the background for the tees; ``close`` waits for the last writes."""

    def __init__(self, redis: Redis, keys: Keys, ttl_seconds: int, metrics: Metrics) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl_seconds
        self._m = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, run_id: RunId, protocol_id: str) -> None:
        if protocol_id == run_id:
            return
        try:
            # Protocol ids go into a key: the run-id rules keep them safe there.
            alias = validate_run_id(protocol_id)
        except InvalidRunId:
            log.debug("not recording the protocol id %r: not a valid key part", protocol_id[:80])
            return
        task = asyncio.create_task(self._write(alias, run_id), name=f"alias:{run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, alias: RunId, run_id: RunId) -> None:
        try:
            await record_alias(self._redis, self._keys, alias, run_id, self._ttl)
        except (redis_errors.RedisError, OSError) as exc:
            self._m.redis_errors.labels("alias").inc()
            log.warning(
                "cannot record the protocol id %s of the run: %s",
                alias,
                exc,
                extra={"run_id": run_id},
            )

    async def close(self, timeout: float = 2.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
