"""Redis key templates and run-id validation, in one place.

A run's keys share the hash tag ``{<run_id>}`` so Redis Cluster keeps both on one node and one
script can update them atomically. Keys can only be built from a ``RunId``, and a ``RunId`` can only
come from ``validate_run_id`` or ``new_run_id``: no unvalidated string reaches a key.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import NewType

from sidecar.errors import InvalidRunId

RunId = NewType("RunId", str)

RUN_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
_RUN_ID = re.compile(RUN_ID_PATTERN)


def validate_run_id(value: str) -> RunId:
    if not _RUN_ID.fullmatch(value):
        raise InvalidRunId(value)
    return RunId(value)


def new_run_id() -> RunId:
    return RunId(f"run-{uuid.uuid4()}")


def new_generation() -> str:
    """Names one run stored under a run id: a reused id is a new generation (per-run tokens
    open one generation only)."""
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "sse:run:"

    def stream(self, run_id: RunId) -> str:
        return f"{self.prefix}{{{run_id}}}"

    def meta(self, run_id: RunId) -> str:
        return f"{self.prefix}{{{run_id}}}:meta"

    def run_id_of(self, stream_key: str) -> RunId:
        """The run id of a stream key this class built (the text between the braces)."""
        return RunId(stream_key[len(self.prefix) + 1 : -1])

    def alias(self, protocol_id: RunId) -> str:
        """String: the run id of the run whose protocol named it ``protocol_id`` (resp_..., ...)."""
        return f"{self.prefix}alias:{{{protocol_id}}}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which any replica asks the producer of a run to cancel it."""
        return f"{self.prefix}cancel"

    @property
    def lease_index(self) -> str:
        """Sorted set of running runs by lease deadline (ms): what the orphan sweep reads."""
        return f"{self.prefix}leases"

    @property
    def epoch(self) -> str:
        """A token every sidecar remembers: when it changes or vanishes, Redis lost its data."""
        return f"{self.prefix}epoch"
