"""The sidecar's exception hierarchy.

Foreign errors (aiohttp, redis-py) are translated into these at the module that talks to the
foreign library, so callers handle one small tree::

    SidecarError
    ├── InvalidRunId          a run id that does not match [A-Za-z0-9._:-]{1,128}
    ├── RunConflict           another producer holds a live lease on the run (HTTP 409)
    ├── RequestTooLarge       a request body over the configured limit (HTTP 413)
    ├── ApiError              a request to the sidecar's own API refused (its HTTP status and
    │                         error type become the JSON error body)
    ├── SSEError
    │   └── EventTooLarge     one upstream event exceeded max_event_bytes
    ├── StoreError            Redis refused or failed a command (translated in sidecar.store)
    │   └── StoreUnavailable  ... because Redis could not be reached in time (connection lost,
    │       │                 timeout, loading, a failover in progress)
    │       └── StoreBusy     ... because every connection of the bounded pool stayed busy
    │                         (this process is saturated; Redis itself may be fine)
    ├── BodyTimeout           a client went silent while sending a request body (HTTP 408)
    ├── RunExists             a client-chosen run id whose keys still exist (HTTP 409)
    └── UpstreamError         the upstream could not be reached or failed mid-response
        ├── UpstreamTimeout   ... because a connect or read deadline passed
        ├── CorruptEncoding   its compressed body cannot be decoded
        └── DecompressedTooLarge  its compressed body decodes past max_decompressed_bytes
"""

from __future__ import annotations

from typing import Any


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class InvalidRunId(SidecarError, ValueError):
    def __init__(self, run_id: str) -> None:
        shown = run_id if len(run_id) <= 64 else run_id[:64] + "..."
        super().__init__(f"invalid run id {shown!r}: expected 1-128 of [A-Za-z0-9._:-]")
        self.run_id = run_id


class RunConflict(SidecarError):
    def __init__(self, run_id: str, producer: str) -> None:
        super().__init__(f"run {run_id!r} is already being produced by {producer!r}")
        self.run_id = run_id
        self.producer = producer


class RunExists(SidecarError):
    """The run id names a stored run, and the reuse policy does not replace it."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} is stored already: a new run needs a new run id")
        self.run_id = run_id


class RequestTooLarge(SidecarError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


class ApiError(SidecarError):
    """Refused before any byte was streamed: becomes a JSON error response."""

    def __init__(self, status: int, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.extra = extra


class StoreError(SidecarError):
    """Redis failed or refused a command; ``operation`` names what the sidecar was doing."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation


class StoreUnavailable(StoreError):
    """Redis could not be reached in time: worth retrying later, the data is not at fault."""


class StoreBusy(StoreUnavailable):
    """No pooled connection came free in time: the process, not Redis, is the bottleneck."""


class BodyTimeout(SidecarError):
    def __init__(self, idle_seconds: float) -> None:
        super().__init__(
            f"no request body bytes for {idle_seconds:g}s (request_body_idle_timeout_seconds)"
        )
        self.idle_seconds = idle_seconds


class SSEError(SidecarError):
    """The upstream's event stream cannot be decoded."""


class EventTooLarge(SSEError):
    """Raised by the decoder; ``completed`` holds the items finished before the oversized one."""

    def __init__(self, limit: int, completed: list[Any]) -> None:
        super().__init__(f"an upstream event exceeded max_event_bytes ({limit} bytes)")
        self.limit = limit
        self.completed = completed


class UpstreamError(SidecarError):
    """The upstream was unreachable, reset the connection, or sent an undecodable body."""


class UpstreamTimeout(UpstreamError):
    """A connect or read deadline passed while waiting for the upstream."""


class CorruptEncoding(UpstreamError):
    def __init__(self, coding: str, why: str) -> None:
        super().__init__(f"cannot decode the upstream's {coding} body: {why}")
        self.coding = coding


class DecompressedTooLarge(UpstreamError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the upstream's compressed body decodes to more than max_decompressed_bytes "
            f"({limit} bytes)"
        )
        self.limit = limit
