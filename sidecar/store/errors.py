"""Where redis-py's and the socket's errors end: ``translate`` turns them into the project's own
(``StoreError`` / ``StoreUnavailable`` / ``StoreBusy``), for every module of the store boundary.
"""

from __future__ import annotations

from redis import exceptions as redis_errors

from sidecar.errors import StoreBusy, StoreError, StoreUnavailable

# Every foreign error a Redis command can raise (the cluster client's own, for a slot no node
# serves, is not a RedisError).
FOREIGN: tuple[type[BaseException], ...] = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    OSError,
    TimeoutError,
)

# Failures that say nothing about the data: Redis is away, busy loading, or failing over (a
# replica answering READONLY, a cluster shard down, a slot migrating, a primary without the
# replicas ``min-replicas-to-write`` asks for). The caller retries later; the rest (a script
# error, OOM, a wrong type) are refusals.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterError,
    redis_errors.MovedError,
    redis_errors.RedisClusterException,
    OSError,
    TimeoutError,
)
_UNAVAILABLE_CODES = ("NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN", "LOADING", "READONLY")
# What redis-py's blocking pool raises (a plain ConnectionError) when no connection came free.
POOL_EXHAUSTED = "No connection available."


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (raised, or a pipeline's reply) means "Redis is not there right now"."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_UNAVAILABLE_CODES)


def translate(operation: str, exc: BaseException) -> StoreError:
    """The project's error for a foreign one (the one place where redis-py's errors end)."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, redis_errors.MaxConnectionsError) or str(exc) == POOL_EXHAUSTED:
        return StoreBusy(operation, message)
    if unavailable(exc):
        return StoreUnavailable(operation, message)
    return StoreError(operation, message)
