"""The store boundary: the only code that talks to Redis (DESIGN.md "The store boundary").

``RunStore`` owns every command, key, Lua script and reply type, and the run-meta schema
(``RunMeta``); it translates redis-py's and the socket's errors into ``StoreError`` /
``StoreUnavailable`` at that one place. The writer, the follower, the replay, the API, the orphan
sweep and the finalizer talk to it, never to redis-py.
"""

from sidecar.store.meta import RunMeta
from sidecar.store.runstore import (
    AppendOp,
    AppendResult,
    AppendStatus,
    CancelRequests,
    Entry,
    FinalizeResult,
    FinalizeStatus,
    Health,
    Pending,
    RunStore,
    Tail,
    backoff,
)

__all__ = [
    "AppendOp",
    "AppendResult",
    "AppendStatus",
    "CancelRequests",
    "Entry",
    "FinalizeResult",
    "FinalizeStatus",
    "Health",
    "Pending",
    "RunMeta",
    "RunStore",
    "Tail",
    "backoff",
]
