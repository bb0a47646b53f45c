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

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which any replica asks the producer of a run to cancel it."""
        return f"{self.prefix}cancel"
