"""The OpenAPI 3.1 document of the sidecar's own routes (served at ``/sidecar/v1/openapi.json``).

Written by hand next to the code it describes, and checked against it: every route of
``sidecar.api.ROUTES`` is an operation here (its route name is the ``operationId``) and nothing
else is (tests/unit/test_openapi.py); schemathesis replays the document against a live sidecar
with auth on and off (tests/functional/test_openapi_fuzz.py). Proxied routes are the upstream's
business and are not described.
"""

from __future__ import annotations

from typing import Any

from sidecar import __version__
from sidecar.keys import RUN_ID_PATTERN
from sidecar.replay import MAX_BATCH, MAX_CURSOR

PATH_RUN = "/sidecar/v1/runs/{run_id}"
PATH_STREAM = "/sidecar/v1/runs/{run_id}/stream"
PATH_LETTA_STREAM = "/v1/runs/{run_id}/stream"
PATH_CANCEL = "/sidecar/v1/runs/{run_id}/cancel"
PATH_OPENAPI = "/sidecar/v1/openapi.json"
PATH_RESPONSES = "/v1/responses/{response_id}"

_REF = "#/components"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}/{kind}/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("schemas", "Error")}},
    }


_COMMON_ERRORS = {
    "400": _ref("responses", "BadRequest"),
    "404": _ref("responses", "NotFound"),
    "503": _ref("responses", "Unavailable"),
}
_AUTH_ERRORS = {
    "401": _ref("responses", "Unauthorized"),
    "403": _ref("responses", "Forbidden"),
}
_BODY_ERRORS = {
    "408": _error("The request body stopped coming (request_body_idle_timeout_seconds)."),
    "413": _error("The request body is too large."),
}

_STREAM_OK = {
    "description": "The run's events after the cursor, each with `id: <seq>`: history, then "
    "live, ending right after the run's terminal. A stream cut before it (slow reader, "
    "shutdown, a hole of lost events: an `event: error` names the loss first) ends without its "
    "chunked terminator: resume with Last-Event-ID.",
    "headers": {"X-Sidecar-Run-Id": _ref("headers", "RunId")},
    "content": {"text/event-stream": {"schema": _ref("schemas", "Event")}},
}
_STREAM_RESPONSES = {
    "200": _STREAM_OK,
    "204": {"description": "The run has ended and nothing follows the cursor."},
    "410": _error(
        "The next event after the cursor is not stored, and why: `cursor_expired` (trimmed by "
        "the length cap: `first_available_seq`), `events_lost` (the writer could not store "
        "seqs `lost_from`..`lost_to`: resume after `resume_after`), `history_lost` (Redis lost "
        "the run's history: `first_available_seq`)."
    ),
}


def _replay_post(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [_ref("parameters", "RunId"), _ref("parameters", "LastEventId")],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("schemas", "ReplayBody")}},
        },
        "responses": {**_STREAM_RESPONSES, **_COMMON_ERRORS, **_AUTH_ERRORS, **_BODY_ERRORS},
    }


def _operations() -> dict[str, dict[str, Any]]:
    return {
        PATH_STREAM: {
            "get": {
                "operationId": "replay",
                "summary": "Replay a run from a cursor, then follow it live",
                "parameters": [
                    _ref("parameters", "RunId"),
                    _ref("parameters", "LastEventId"),
                    {
                        "name": "starting_after",
                        "in": "query",
                        "description": "The cursor when there is no Last-Event-ID header.",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR},
                    },
                    {
                        "name": "batch_size",
                        "in": "query",
                        "description": "Catch-up page size.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
                    },
                    {
                        "name": "include_pings",
                        "in": "query",
                        "description": "Letta ping events instead of `: ping` comments.",
                        "schema": {"type": "boolean"},
                    },
                ],
                "responses": {**_STREAM_RESPONSES, **_COMMON_ERRORS, **_AUTH_ERRORS},
            },
            "post": _replay_post("replay_post", "Replay a run (Letta's body form)"),
        },
        PATH_LETTA_STREAM: {
            "post": _replay_post(
                "letta_replay",
                "Replay a run: the route letta-client's runs.messages.stream calls",
            ),
        },
        PATH_RUN: {
            "get": {
                "operationId": "status",
                "summary": "A run's status",
                "parameters": [_ref("parameters", "RunId")],
                "responses": {
                    "200": {
                        "description": "The run's meta.",
                        "content": {"application/json": {"schema": _ref("schemas", "RunStatus")}},
                    },
                    **_COMMON_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
        },
        PATH_CANCEL: {
            "post": {
                "operationId": "cancel",
                "summary": "Cancel a running run, wherever it is produced",
                "parameters": [_ref("parameters", "RunId")],
                "responses": {
                    "200": {
                        "description": "The run's status once its `cancelled` terminal landed.",
                        "content": {"application/json": {"schema": _ref("schemas", "RunStatus")}},
                    },
                    "202": {
                        "description": "The terminal did not land within 5 s; it will.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["run_id", "status"],
                                    "properties": {
                                        "run_id": {"type": "string"},
                                        "status": {"const": "cancelling"},
                                    },
                                }
                            }
                        },
                    },
                    "409": _error("The run has ended already (`run_status` says how)."),
                    **_COMMON_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
        },
        PATH_RESPONSES: {
            "get": {
                "operationId": "responses_resume",
                "summary": "OpenAI Responses resume (`stream=true`), from Redis when the sidecar "
                "holds the run; anything else is proxied to the upstream",
                "parameters": [
                    {
                        "name": "response_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "stream",
                        "in": "query",
                        "description": "Only `true` is served by the sidecar.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "starting_after",
                        "in": "query",
                        "description": "The cursor: a `sequence_number`.",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR},
                    },
                ],
                # Any other answer may be the upstream's (proxied) or the sidecar's JSON error:
                # only the stream is the sidecar's alone.
                "responses": {
                    "200": _STREAM_OK,
                    "default": {
                        "description": "The upstream's answer (a response the sidecar does not "
                        "hold, or not a stream), or the replay's JSON error (as for "
                        "`GET /sidecar/v1/runs/{run_id}/stream`)."
                    },
                },
            },
        },
        PATH_OPENAPI: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document of the sidecar's own routes.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            },
        },
    }


_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}

_COMPONENTS: dict[str, Any] = {
    "parameters": {
        "RunId": {
            "name": "run_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{RUN_ID_PATTERN}$"},
            "examples": {"run": {"value": "run-42"}},
        },
        "LastEventId": {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "The cursor: the last seq the reader has (what EventSource sends).",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        },
    },
    "headers": {
        "RunId": {"description": "The run's id.", "schema": {"type": "string"}},
    },
    "responses": {
        "BadRequest": _error("Invalid run id, cursor, batch size or body."),
        "NotFound": _error("No such run (never existed, or its keys expired)."),
        "Unavailable": _error("Redis is unreachable."),
        "Unauthorized": _error("A token is required and is missing, invalid or expired."),
        "Forbidden": _error(
            "A valid token, for another run or for an earlier run that had the same id."
        ),
    },
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "Event": {
            "type": "object",
            "description": "One server-sent event: the upstream's, as the live client got it "
            "(`id` is its seq; Letta ping events have none).",
            "required": ["data"],
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "retry": {"type": "integer", "minimum": 0},
            },
        },
        "ReplayBody": {
            "type": "object",
            "description": "Letta's defaults: a null field means its default; `poll_interval` "
            "is accepted and ignored.",
            "properties": {
                "starting_after": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": MAX_CURSOR,
                },
                "include_pings": {"type": ["boolean", "null"]},
                "batch_size": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_BATCH},
                "poll_interval": {"type": ["number", "null"], "minimum": 0},
            },
        },
        "RunStatus": {
            "type": "object",
            "required": [
                "run_id",
                "status",
                "stop_reason",
                "error",
                "last_seq",
                "created_ms",
                "updated_ms",
                "finished_ms",
                "forced_done",
                "incomplete",
                "trimmed_events",
                "lost_ranges",
                "history_lost_through",
                "history_lost_ranges",
                "dialect",
                "protocol_id",
            ],
            "properties": {
                "run_id": {"type": "string"},
                "status": {"type": "string"},
                "stop_reason": _NULLABLE_STR,
                "error": {"description": "The run's error payload (JSON), or null."},
                "last_seq": {"type": "integer", "minimum": 0},
                "created_ms": _NULLABLE_INT,
                "updated_ms": _NULLABLE_INT,
                "finished_ms": _NULLABLE_INT,
                "forced_done": _NULLABLE_STR,
                "incomplete": _NULLABLE_STR,
                "trimmed_events": {"type": "integer", "minimum": 0},
                "lost_ranges": {
                    "type": "array",
                    "description": "Seq ranges [first, last] the writer could not store.",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
                "history_lost_through": _NULLABLE_INT,
                "history_lost_ranges": {
                    "type": "array",
                    "description": "Seq ranges [first, last] Redis confirmed, then lost.",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
                "dialect": _NULLABLE_STR,
                "protocol_id": _NULLABLE_STR,
            },
        },
    },
    "securitySchemes": {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "replay_token, or the run's own X-Sidecar-Replay-Token.",
        },
        "query_token": {"type": "apiKey", "in": "query", "name": "token"},
    },
}


def openapi_document(*, auth: bool) -> dict[str, Any]:
    """The document; with ``auth``, the run routes declare their bearer / ``?token=`` security."""
    operations = _operations()
    for path_item in operations.values():
        for operation in path_item.values():
            if auth and "security" not in operation:
                operation["security"] = [{"bearer": []}, {"query_token": []}]
            elif not auth:
                operation.pop("security", None)
                for code in _AUTH_ERRORS:
                    operation["responses"].pop(code, None)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sse-sidecar",
            "version": __version__,
            "description": "The sidecar's own routes: replay, status, cancel, the OpenAI "
            "Responses resume. Every other request is proxied to the upstream unchanged.",
        },
        "paths": operations,
        "components": _COMPONENTS,
    }
