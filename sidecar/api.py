"""The sidecar's own routes on the traffic port: replay, run status, cancel.

| route | handler |
|---|---|
| ``GET /sidecar/v1/runs/{run_id}/stream`` | replay (cursor: Last-Event-ID, ?starting_after) |
| ``POST /sidecar/v1/runs/{run_id}/stream`` and ``/v1/runs/{run_id}/stream`` | replay, Letta body |
| ``GET /sidecar/v1/runs/{run_id}`` | status JSON |
| ``POST /sidecar/v1/runs/{run_id}/cancel`` | cancel, wherever the run is produced |
| ``GET /v1/responses/{response_id}`` | OpenAI Responses resume (``?stream=true``) from Redis when
  this sidecar holds the run, else proxied |
| ``GET /sidecar/v1/openapi.json`` | the OpenAPI document of these routes (``sidecar.openapi``) |

Every ``{run_id}`` may also be the id the run's protocol gave it (``resp_...``, ``msg_...``,
``chatcmpl-...``): a run id that names no run is looked up as such an alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from sidecar.auth import Authorizer, Grant, Verdict
from sidecar.dialects.openai_responses import resume_cursor
from sidecar.ending import Finalizer
from sidecar.errors import ApiError, InvalidRunId, StoreError
from sidecar.follow import Follower, Subscription
from sidecar.keys import RunId, validate_run_id
from sidecar.openapi import openapi_document
from sidecar.proxy import json_error
from sidecar.replay import (
    DEFAULT_BATCH,
    Replayer,
    ReplayParams,
    cursor_param,
    ensure_generation,
    params_from_body,
    params_from_query,
)
from sidecar.runs import RunRegistry
from sidecar.store import FinalizeStatus, RunMeta, RunStore
from sidecar.telemetry import Metrics
from sidecar.terminal import Dialect, EndCause

log = logging.getLogger(__name__)

# How long the cancel route waits for the run's terminal before answering 202 instead of 200.
CANCEL_WAIT_SECONDS = 5.0
# How often it asks again meanwhile.
CANCEL_REPEAT_SECONDS = 1.0

_OUTCOME_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found"}
_OUTCOME_BY_STATUS |= {408: "bad_request", 410: "gone", 413: "bad_request", 503: "unavailable"}
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
        "dialect": meta.dialect,
        "protocol_id": meta.protocol_id,
    }


# (method, path, Api method, route name: the ``route`` label of the HTTP metrics)
ROUTES = (
    ("GET", "/sidecar/v1/runs/{run_id}/stream", "replay_get", "replay"),
    ("POST", "/sidecar/v1/runs/{run_id}/stream", "replay_post", "replay_post"),
    ("POST", "/v1/runs/{run_id}/stream", "replay_post", "letta_replay"),
    ("GET", "/sidecar/v1/runs/{run_id}", "status", "status"),
    ("POST", "/sidecar/v1/runs/{run_id}/cancel", "cancel", "cancel"),
    ("GET", "/v1/responses/{response_id}", "responses_resume", "responses_resume"),
    ("GET", "/sidecar/v1/openapi.json", "openapi", "openapi"),
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RunHandler = Callable[[RunId, Grant], Awaitable[web.StreamResponse]]


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
        *,
        proxy: Handler,
        body_idle_seconds: float,
    ) -> None:
        self._store = store
        self._proxy = proxy
        self._body_idle = body_idle_seconds
        self._openapi = orjson.dumps(openapi_document(auth=authorizer.enabled))
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

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")

    async def responses_resume(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}?stream=true&starting_after=N`` (what the openai SDK's
        ``responses.retrieve(id, stream=True, starting_after=N)`` sends): served from Redis,
        cursor = the upstream's ``sequence_number``, when this sidecar holds the run; anything
        else (not a stream, a response it never saw) is the upstream's."""
        if request.query.get("stream", "").lower() not in ("true", "1"):
            return await self._proxy(request)
        try:
            response_id = validate_run_id(request.match_info["response_id"])
            run_id = await self._store.resolve_alias(response_id)
            meta = None if run_id is None else await self._store.meta(run_id)
        except InvalidRunId:
            return await self._proxy(request)
        except StoreError as exc:
            self._m.redis_errors.labels("api").inc()
            log.warning("cannot look up a Responses run, proxying the resume: %s", exc)
            return await self._proxy(request)
        if run_id is None or meta is None or meta.dialect != Dialect.OPENAI_RESPONSES:
            return await self._proxy(request)
        try:
            grant = self._check(request, run_id)
            after = request.query.get("starting_after")
            cursor = 0 if after is None else resume_cursor(meta.dialect_state, cursor_param(after))
            params = ReplayParams(cursor, include_pings=False, batch_size=DEFAULT_BATCH)
            return await self._replayer.stream(request, run_id, params, grant)
        except ApiError as exc:
            return self._replay_refused(exc)
        except StoreError as exc:
            return self._replay_unavailable(exc)

    # -- internals ---------------------------------------------------------------------------

    async def _replay(self, request: web.Request, *, post: bool) -> web.StreamResponse:
        try:
            run_id, grant = await self._authorized(request)
            if post:
                params = await params_from_body(request, self._body_idle)
            else:
                params = params_from_query(request)
            return await self._or_alias(
                request,
                run_id,
                grant,
                lambda run, run_grant: self._replayer.stream(request, run, params, run_grant),
            )
        except ApiError as exc:
            return self._replay_refused(exc)
        except StoreError as exc:
            return self._replay_unavailable(exc)

    def _replay_refused(self, exc: ApiError) -> web.StreamResponse:
        outcome = _OUTCOME_BY_TYPE.get(exc.type) or _OUTCOME_BY_STATUS.get(exc.status, "error")
        self._m.replay_requests.labels(outcome).inc()
        if exc.status == 408:
            self._m.bad_requests.labels("body_timeout").inc()
        return json_error(exc.status, exc.type, str(exc), **exc.extra)

    def _replay_unavailable(self, exc: StoreError) -> web.StreamResponse:
        self._m.redis_errors.labels("replay").inc()
        self._m.replay_requests.labels("unavailable").inc()
        return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    async def _guarded(self, request: web.Request, handler: RunHandler) -> web.StreamResponse:
        try:
            return await self._or_alias(request, *await self._authorized(request), handler)
        except ApiError as exc:
            return json_error(exc.status, exc.type, str(exc), **exc.extra)
        except StoreError as exc:
            self._m.redis_errors.labels("api").inc()
            return json_error(503, "redis_unavailable", f"cannot read the run: {exc}")

    async def _authorized(self, request: web.Request) -> tuple[RunId, Grant]:
        """The validated run id, once the caller may touch that run, and the generation of it
        that the caller's token opens; a caller without a valid token is refused before any
        Redis read. A per-run token for another run is accepted when the id is the protocol id
        (alias) of the token's run."""
        try:
            run_id = validate_run_id(request.match_info["run_id"])
        except InvalidRunId as exc:
            raise ApiError(400, "invalid_run_id", str(exc)) from None
        grant = self._auth.check(request, run_id)
        if grant.verdict is Verdict.OTHER_RUN and (alias := await self._alias_of(run_id)):
            run_id, grant = alias, self._auth.check(request, alias)
        _raise_unless_allowed(grant.verdict)
        return run_id, grant

    async def _or_alias(
        self, request: web.Request, run_id: RunId, grant: Grant, handler: RunHandler
    ) -> web.StreamResponse:
        """``handler(run_id)``; when no run has that id, the run whose protocol gave it that id
        (looked up only then: a run id costs no extra Redis read)."""
        try:
            return await handler(run_id, grant)
        except ApiError as exc:
            if exc.type != "run_not_found" or (alias := await self._alias_of(run_id)) is None:
                raise
        return await handler(alias, self._check(request, alias))

    def _check(self, request: web.Request, run_id: RunId) -> Grant:
        grant = self._auth.check(request, run_id)
        _raise_unless_allowed(grant.verdict)
        return grant

    async def _alias_of(self, protocol_id: RunId) -> RunId | None:
        alias = await self._store.resolve_alias(protocol_id)
        return alias if alias != protocol_id else None

    async def _meta(self, run_id: RunId) -> RunMeta:
        meta = await self._store.meta(run_id) or self._runs.meta(run_id)
        if meta is None:
            raise ApiError(404, "run_not_found", f"no run {run_id!r} (unknown or expired)")
        return meta

    async def _status(self, run_id: RunId, grant: Grant) -> web.StreamResponse:
        meta = await self._meta(run_id)
        ensure_generation(grant, meta.generation)
        return web.json_response(status_body(meta))

    async def _cancel(self, run_id: RunId, grant: Grant) -> web.StreamResponse:
        local = self._runs.get(run_id)
        if local is not None:
            ensure_generation(grant, local.generation)
            local.cancel(EndCause.CANCELLED)
            try:
                # Its terminal in Redis, not only handed to the writer: the status read below
                # must say how the run ended.
                async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                    await local.wait()
                    await local.stream.ended.wait()
            except TimeoutError:
                return web.json_response({"run_id": run_id, "status": "cancelling"}, status=202)
            return web.json_response(status_body(await self._meta(run_id)))
        meta = await self._meta(run_id)
        ensure_generation(grant, meta.generation)
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
                while not await _ended_within(sub, CANCEL_REPEAT_SECONDS):
                    # A producer whose subscription was being re-made (its Redis node failed
                    # over) did not hear it: ask again (cancelling twice is harmless).
                    with contextlib.suppress(StoreError):
                        await self._store.publish_cancel(run_id)
        except TimeoutError:
            # Nobody ended it: if its producer vanished meanwhile, end it here.
            ended = await self._finalizer.end(run_id, EndCause.CANCELLED, require_dead=True)
            if ended is FinalizeStatus.ALIVE:
                return web.json_response({"run_id": run_id, "status": "cancelling"}, status=202)
        finally:
            self._follower.unsubscribe(sub)
        return web.json_response(status_body(await self._meta(run_id)))


async def _ended_within(sub: Subscription, seconds: float) -> bool:
    """Whether the run's last entry reached ``sub`` within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while not any(e.complete for e in sub.take()):
                await sub.ready.wait()
    except TimeoutError:
        return False
    return True


def _raise_unless_allowed(verdict: Verdict) -> None:
    if verdict is Verdict.OTHER_RUN:
        raise ApiError(403, "forbidden", "this token is for another run")
    if verdict is not Verdict.ALLOWED:
        raise ApiError(401, "unauthorized", f"a valid bearer token is required ({verdict.value})")
