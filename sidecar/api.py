"""The sidecar's own routes on the traffic port: replay, run status, cancel.

| route | handler |
|---|---|
| ``GET /sidecar/v1/runs/{run_id}/stream`` | replay (cursor: Last-Event-ID, ?starting_after) |
| ``POST /sidecar/v1/runs/{run_id}/stream`` and ``/v1/runs/{run_id}/stream`` | replay, Letta body |
| ``GET /sidecar/v1/runs/{run_id}`` | status JSON |
| ``POST /sidecar/v1/runs/{run_id}/cancel`` | cancel, wherever the run is produced |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.auth import Authorizer, Verdict
from sidecar.ending import Finalizer
from sidecar.errors import ApiError, InvalidRunId, StoreError
from sidecar.follow import Follower
from sidecar.keys import RunId, validate_run_id
from sidecar.proxy import json_error
from sidecar.replay import Replayer, params_from_body, params_from_query
from sidecar.runs import RunRegistry
from sidecar.store import FinalizeStatus, RunMeta, RunStore
from sidecar.telemetry import Metrics
from sidecar.terminal import EndCause

log = logging.getLogger(__name__)

# How long the cancel route waits for the run's terminal before answering 202 instead of 200.
CANCEL_WAIT_SECONDS = 5.0

_OUTCOME_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found"}
_OUTCOME_BY_STATUS |= {410: "gone", 503: "unavailable"}
# A 410 for lost data is not a retention problem (``gone``): it has its own outcome.
_OUTCOME_BY_TYPE = {"events_lost": "lost", "history_lost": "lost"}


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
        "lost_ranges": [list(r) for r in meta.lost_ranges],
        "history_lost_through": meta.history_lost_through or None,
        "history_lost_ranges": [list(r) for r in meta.history_lost_ranges],
    }


# (method, path, Api method, route name: the ``route`` label of the HTTP metrics)
ROUTES = (
    ("GET", "/sidecar/v1/runs/{run_id}/stream", "replay_get", "replay"),
    ("POST", "/sidecar/v1/runs/{run_id}/stream", "replay_post", "replay_post"),
    ("POST", "/v1/runs/{run_id}/stream", "replay_post", "letta_replay"),
    ("GET", "/sidecar/v1/runs/{run_id}", "status", "status"),
    ("POST", "/sidecar/v1/runs/{run_id}/cancel", "cancel", "cancel"),
)


class Api:
    def __init__(
        self,
        store: RunStore,
        replayer: Replayer,
        follower: Follower,
        runs: RunRegistry,
        finalizer: Finalizer,
        authorizer: Authorizer,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._replayer = replayer
        self._follower = follower
        self._runs = runs
        self._finalizer = finalizer
        self._auth = authorizer
        self._m = metrics

    # -- handlers ----------------------------------------------------------------------------

    async def replay_get(self, request: web.Request) -> web.StreamResponse:
        return await self._replay(request, post=False)

    async def replay_post(self, request: web.Request) -> web.StreamResponse:
        return await self._replay(request, post=True)

    async def status(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._status)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._cancel)

    # -- internals ---------------------------------------------------------------------------

    async def _replay(self, request: web.Request, *, post: bool) -> web.StreamResponse:
        try:
            run_id = self._authorized(request)
            params = await params_from_body(request) if post else params_from_query(request)
            return await self._replayer.stream(request, run_id, params)
        except ApiError as exc:
            outcome = _OUTCOME_BY_TYPE.get(exc.type) or _OUTCOME_BY_STATUS.get(exc.status, "error")
            self._m.replay_requests.labels(outcome).inc()
            return json_error(exc.status, exc.type, str(exc), **exc.extra)
        except StoreError as exc:
            self._m.redis_errors.labels("replay").inc()
            self._m.replay_requests.labels("unavailable").inc()
            return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[RunId], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(self._authorized(request))
        except ApiError as exc:
            return json_error(exc.status, exc.type, str(exc), **exc.extra)
        except StoreError as exc:
            self._m.redis_errors.labels("api").inc()
            return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    def _authorized(self, request: web.Request) -> RunId:
        """The validated run id, once the caller may touch that run (before any key is built)."""
        try:
            run_id = validate_run_id(request.match_info["run_id"])
        except InvalidRunId as exc:
            raise ApiError(400, "invalid_run_id", str(exc)) from None
        verdict = self._auth.check(request, run_id)
        if verdict is Verdict.OTHER_RUN:
            raise ApiError(403, "forbidden", "this token is for another run")
        if verdict is not Verdict.ALLOWED:
            raise ApiError(
                401, "unauthorized", f"a valid bearer token is required ({verdict.value})"
            )
        return run_id

    async def _meta(self, run_id: RunId) -> RunMeta:
        meta = await self._store.meta(run_id) or self._runs.meta(run_id)
        if meta is None:
            raise ApiError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        return meta

    async def _status(self, run_id: RunId) -> web.StreamResponse:
        return web.json_response(status_body(await self._meta(run_id)))

    async def _cancel(self, run_id: RunId) -> web.StreamResponse:
        local = self._runs.get(run_id)
        if local is not None:
            local.cancel(EndCause.CANCELLED)
            try:
                await asyncio.wait_for(local.wait(), CANCEL_WAIT_SECONDS)
            except TimeoutError:
                return web.json_response({"run_id": run_id, "status": "cancelling"}, status=202)
            return web.json_response(status_body(await self._meta(run_id)))
        meta = await self._store.meta(run_id)
        if meta is None:
            raise ApiError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        if meta.status != "running":
            raise ApiError(
                409, "run_finished", f"run {run_id!r} already ended", run_status=meta.status
            )
        # Another process produces it: ask every replica; the producer cancels its upstream
        # request and appends the terminal. Wait for that terminal on the live tail.
        sub = self._follower.subscribe(run_id, meta.last_seq, 1 << 20)
        try:
            receivers = await self._store.publish_cancel(run_id)
            log.info("cancel requested", extra={"run_id": run_id, "replicas": receivers})
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                while not any(e.complete for e in sub.take()):
                    await sub.ready.wait()
        except TimeoutError:
            # Nobody ended it: if its producer vanished meanwhile, end it here.
            ended = await self._finalizer.end(run_id, EndCause.CANCELLED, require_dead=True)
            if ended is FinalizeStatus.ALIVE:
                return web.json_response({"run_id": run_id, "status": "cancelling"}, status=202)
        finally:
            self._follower.unsubscribe(sub)
        return web.json_response(status_body(await self._meta(run_id)))
