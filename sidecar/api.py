"""The sidecar's own routes on the traffic port: replay, run status, cancel.

| route | handler |
|---|---|
| ``GET /sidecar/v1/runs/{run_id}/stream`` | replay (cursor: Last-Event-ID, ?starting_after) |
| ``POST /sidecar/v1/runs/{run_id}/stream`` and ``/v1/runs/{run_id}/stream`` | replay, Letta body |
| ``GET /sidecar/v1/runs/{run_id}`` | status JSON |
| ``POST /sidecar/v1/runs/{run_id}/cancel`` | cancel, wherever the run is produced |
| ``GET /sidecar/v1/openapi.json`` | the OpenAPI document of these routes (``sidecar.openapi``) |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sidecar.auth import Authorizer, Grant, Verdict
from sidecar.errors import InvalidRunId
from sidecar.follow import Follower
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.openapi import openapi_document
from sidecar.proxy import json_error
from sidecar.replay import (
    Replayer,
    ReplayError,
    ensure_generation,
    params_from_body,
    params_from_query,
)
from sidecar.runs import RunMeta, RunRegistry
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause

log = logging.getLogger(__name__)

# How long the cancel route waits for the run's terminal before answering 202 instead of 200.
CANCEL_WAIT_SECONDS = 5.0

_OUTCOME_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found"}
_OUTCOME_BY_STATUS |= {408: "bad_request", 410: "gone", 413: "bad_request", 503: "unavailable"}


def status_body(meta: RunMeta) -> dict[str, Any]:
    return {
        "run_id": meta.run_id,
        "status": meta.status,
        "stop_reason": meta.stop_reason,
        "error": meta.error,
        "last_seq": meta.last_seq,
        "created_ms": meta.created_ms,
        "updated_ms": meta.updated_ms,
        "finished_ms": meta.finished_ms,
        "forced_done": meta.forced_done,
        "incomplete": meta.incomplete,
        "trimmed_events": meta.trimmed_events,
    }


# (method, path, Api method, route name: the ``route`` label of the HTTP metrics)
ROUTES = (
    ("GET", "/sidecar/v1/runs/{run_id}/stream", "replay_get", "replay"),
    ("POST", "/sidecar/v1/runs/{run_id}/stream", "replay_post", "replay_post"),
    ("POST", "/v1/runs/{run_id}/stream", "replay_post", "letta_replay"),
    ("GET", "/sidecar/v1/runs/{run_id}", "status", "status"),
    ("POST", "/sidecar/v1/runs/{run_id}/cancel", "cancel", "cancel"),
    ("GET", "/sidecar/v1/openapi.json", "openapi", "openapi"),
)


class Api:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        replayer: Replayer,
        follower: Follower,
        runs: RunRegistry,
        authorizer: Authorizer,
        metrics: Metrics,
        *,
        cancel_channel: str,
        body_idle_seconds: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._replayer = replayer
        self._follower = follower
        self._runs = runs
        self._auth = authorizer
        self._m = metrics
        self._cancel_channel = cancel_channel
        self._body_idle = body_idle_seconds
        self._openapi = orjson.dumps(openapi_document(auth=authorizer.enabled))

    # -- handlers ----------------------------------------------------------------------------

    async def replay_get(self, request: web.Request) -> web.StreamResponse:
        return await self._replay(request, post=False)

    async def replay_post(self, request: web.Request) -> web.StreamResponse:
        return await self._replay(request, post=True)

    async def status(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._status)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._cancel)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")

    # -- internals ---------------------------------------------------------------------------

    async def _replay(self, request: web.Request, *, post: bool) -> web.StreamResponse:
        try:
            run_id, grant = self._authorized(request)
            if post:
                params = await params_from_body(request, self._body_idle)
            else:
                params = params_from_query(request)
            return await self._replayer.stream(request, run_id, params, grant)
        except ReplayError as exc:
            self._m.replay_requests.labels(_OUTCOME_BY_STATUS.get(exc.status, "error")).inc()
            if exc.status == 408:
                self._m.bad_requests.labels("body_timeout").inc()
            return json_error(exc.status, exc.type, str(exc), **exc.extra)
        except (redis_errors.RedisError, OSError) as exc:
            self._m.redis_errors.labels("replay").inc()
            self._m.replay_requests.labels("unavailable").inc()
            return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[RunId, Grant], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(*self._authorized(request))
        except ReplayError as exc:
            return json_error(exc.status, exc.type, str(exc), **exc.extra)
        except (redis_errors.RedisError, OSError) as exc:
            self._m.redis_errors.labels("api").inc()
            return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    def _authorized(self, request: web.Request) -> tuple[RunId, Grant]:
        """The validated run id, once the caller may touch that run (before any key is built),
        and the generation of it that the caller's token opens."""
        try:
            run_id = validate_run_id(request.match_info["run_id"])
        except InvalidRunId as exc:
            raise ReplayError(400, "invalid_run_id", str(exc)) from None
        grant = self._auth.check(request, run_id)
        if grant.verdict is Verdict.OTHER_RUN:
            raise ReplayError(403, "forbidden", "this token is for another run")
        if grant.verdict is not Verdict.ALLOWED:
            raise ReplayError(
                401, "unauthorized", f"a valid bearer token is required ({grant.verdict.value})"
            )
        return run_id, grant

    async def _status(self, run_id: RunId, grant: Grant) -> web.StreamResponse:
        meta = await self._replayer.meta(run_id)
        if meta is None:
            raise ReplayError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        ensure_generation(grant, meta.generation)
        return web.json_response(status_body(meta))

    async def _cancel(self, run_id: RunId, grant: Grant) -> web.StreamResponse:
        local = self._runs.get(run_id)
        if local is not None:
            ensure_generation(grant, local.generation)
            local.cancel(EndCause.CANCELLED)
            await asyncio.wait_for(local.wait(), CANCEL_WAIT_SECONDS)
            return await self._after_cancel(run_id)
        meta = await self._replayer.meta(run_id)
        if meta is None:
            raise ReplayError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        ensure_generation(grant, meta.generation)
        if meta.status != "running":
            raise ReplayError(
                409, "run_finished", f"run {run_id!r} already ended", run_status=meta.status
            )
        # Another process produces it: ask every replica; the producer cancels its upstream
        # request and appends the terminal. Wait for that terminal on the live tail.
        sub = self._follower.subscribe(self._keys.stream(run_id), meta.last_seq, 1 << 20)
        try:
            receivers = await self._redis.publish(self._cancel_channel, run_id)
            log.info("cancel requested", extra={"run_id": run_id, "replicas": receivers})
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                while not any(e.complete for e in sub.take()):
                    await sub.ready.wait()
        except TimeoutError:
            # Nobody ended it: if its producer vanished meanwhile, end it here.
            if not await self._replayer.end_orphan(run_id, EndCause.CANCELLED, require_dead=True):
                return web.json_response({"run_id": run_id, "status": "cancelling"}, status=202)
        finally:
            self._follower.unsubscribe(sub)
        return await self._after_cancel(run_id)

    async def _after_cancel(self, run_id: RunId) -> web.StreamResponse:
        meta = await self._replayer.meta(run_id)
        if meta is None:
            raise ReplayError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        return web.json_response(status_body(meta))
