"""The store boundary: the only code that talks to Redis (DESIGN.md "The store boundary").

``RunStore`` owns every command, key, Lua script and reply type, and the run-meta schema
(``RunMeta``); it translates redis-py's and the socket's errors into ``StoreError`` /
``StoreUnavailable`` at that one place (``errors.py``), for one Redis, Sentinel or Cluster. The
writer, the follower, the replay, the API, the orphan sweep and the finalizer talk to it, never
to redis-py; the follower drives its ``LiveTail``.
"""

from sidecar.store.entries import Entry, Page
from sidecar.store.meta import RunMeta
from sidecar.store.runstore import (
    AppendOp,
    AppendResult,
    AppendStatus,
    CancelRequests,
    FinalizeResult,
    FinalizeStatus,
    Health,
    Pending,
    RunStore,
    TailMode,
    backoff,
)
from sidecar.store.tail import LiveTail, TailListener

__all__ = [
    "AppendOp",
    "AppendResult",
    "AppendStatus",
    "CancelRequests",
    "Entry",
    "FinalizeResult",
    "FinalizeStatus",
    "Health",
    "LiveTail",
    "Page",
    "Pending",
    "RunMeta",
    "RunStore",
    "TailListener",
    "TailMode",
    "backoff",
]
