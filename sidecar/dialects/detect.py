"""``auto``: which protocol a stream speaks, from its first data event (the request path as a hint).

Decided once, on the first event, before anything could be synthesized; a shape that says nothing
decisive leaves it to the path hint, and without one the stream is ``generic``. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from sidecar.sse import Event
from sidecar.terminal import Dialect

_ANTHROPIC_TYPES = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    }
)


def hint_for_path(path: str) -> Dialect | None:
    """The dialect a request path usually streams, if it is one of the well-known routes."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return Dialect.OPENAI_CHAT
    if path.endswith("/responses") or "/responses/" in path:
        return Dialect.OPENAI_RESPONSES
    if path.endswith("/v1/messages"):
        return Dialect.ANTHROPIC
    if "/agents/" in path and path.endswith(("/stream", "/messages")):
        return Dialect.LETTA
    return None


def detect(event: Event, payload: Any, hint: Dialect | None) -> Dialect:
    """The dialect of a stream whose first data event is ``event`` (``payload``: its JSON)."""
    shape = _by_shape(event, payload)
    if shape is not None:
        return shape
    return hint if hint is not None else Dialect.GENERIC


def _by_shape(event: Event, payload: Any) -> Dialect | None:
    name = event.event
    if not isinstance(payload, dict):
        return None  # [DONE], plain text: letta, chat and generic alike
    if "message_type" in payload:
        return Dialect.LETTA
    kind = payload.get("type")
    if isinstance(kind, str):
        if kind.startswith("response.") or (name or "").startswith("response."):
            return Dialect.OPENAI_RESPONSES
        if kind in _ANTHROPIC_TYPES or kind == "ping":
            return Dialect.ANTHROPIC
        if kind == "error":
            # Anthropic nests its error object; Responses puts code/message at the top with a
            # sequence_number.
            if isinstance(payload.get("error"), dict):
                return Dialect.ANTHROPIC
            if "sequence_number" in payload:
                return Dialect.OPENAI_RESPONSES
            return None
    if payload.get("object") == "chat.completion.chunk" or isinstance(payload.get("choices"), list):
        return Dialect.OPENAI_CHAT
    if name is None and isinstance(payload.get("error"), dict):
        return Dialect.OPENAI_CHAT  # a chat stream that failed before its first chunk
    return None
