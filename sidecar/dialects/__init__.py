"""One pure module per protocol, and ``auto`` detection.

| module | dialect |
|---|---|
| ``letta`` | Letta agent streams (``message_type``, ``[DONE]``) |
| ``openai_chat`` | OpenAI Chat Completions chunks (``finish_reason``, ``[DONE]``) |
| ``openai_responses`` | OpenAI Responses events (``response.completed`` ..., ``sequence_number``) |
| ``anthropic`` | Anthropic Messages events (``message_stop``, ``event: error``) |
| ``generic`` | anything else (``[DONE]`` if used, else a clean close) |

Each tracker implements ``sidecar.terminal.DialectTracker``; ``new_tracker`` builds one for a
run, ``restore_tracker`` rebuilds one from a run's stored meta.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.dialects.anthropic import AnthropicTracker
from sidecar.dialects.detect import detect, hint_for_path
from sidecar.dialects.generic import GenericTracker
from sidecar.dialects.letta import LettaTracker
from sidecar.dialects.openai_chat import OpenAIChatTracker
from sidecar.dialects.openai_responses import OpenAIResponsesTracker
from sidecar.terminal import Dialect, DialectTracker, Status

TRACKERS: dict[Dialect, type[DialectTracker]] = {
    Dialect.LETTA: LettaTracker,
    Dialect.OPENAI_CHAT: OpenAIChatTracker,
    Dialect.OPENAI_RESPONSES: OpenAIResponsesTracker,
    Dialect.ANTHROPIC: AnthropicTracker,
    Dialect.GENERIC: GenericTracker,
}

__all__ = [
    "TRACKERS",
    "detect",
    "hint_for_path",
    "new_tracker",
    "restore_tracker",
]


def new_tracker(dialect: Dialect, default_status: Status = Status.FAILED) -> DialectTracker:
    return TRACKERS[dialect](default_status)


def restore_tracker(
    dialect: str | None,
    *,
    stop_reason: str | None,
    error: Any | None,
    last_seq: int,
    protocol_id: str | None,
    dialect_state: str | None,
    default_status: Status = Status.FAILED,
) -> DialectTracker:
    """The tracker of a stored run; a run stored before dialects existed is ``letta``."""
    try:
        kind = Dialect(dialect) if dialect else Dialect.LETTA
    except ValueError:
        kind = Dialect.GENERIC
    state: Mapping[str, Any] | None = None
    if dialect_state:
        try:
            loaded = orjson.loads(dialect_state)
        except orjson.JSONDecodeError:
            loaded = None
        state = loaded if isinstance(loaded, dict) else None
    return TRACKERS[kind].restore(
        stop_reason=stop_reason,
        error=error,
        last_seq=last_seq,
        protocol_id=protocol_id,
        state=state,
        default_status=default_status,
    )
