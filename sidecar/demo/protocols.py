"""What the demo LLM service streams, in each protocol it speaks, and how each scenario ends.

One ``Protocol`` per wire format: Letta's agent stream, OpenAI Chat Completions, OpenAI Responses,
Anthropic Messages, and a generic event stream. ``Protocol.chunks(req)`` yields the response body
one SSE item per chunk, made as it is sent (so dates are real). The payloads follow each API's
documented shapes, closely enough that the official SDKs parse them.

Scenarios (not every protocol has every one; ``Protocol.endings`` lists its own):
``normal`` a healthy answer and the protocol's own terminal; ``error_then_done`` the protocol's own
way to fail (the upstream's terminal still comes); ``dies`` the body ends cleanly without any
terminal; ``reset`` the TCP connection is cut mid-stream; ``error_no_done`` / ``stop_no_done`` an
error / a stop reason and then a clean end without the terminal.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ANSWER = (
    "Server-sent events carry an answer to the client one token at a time, and a sidecar "
    "next to the service keeps a copy of every event so nothing is lost when the client drops."
)
WORDS = ANSWER.split()
MODEL = "demo-llm-1"
# The timestamp of every object of a request that names its ids (X-Demo-Id): reproducible output.
FIXED_TIME = 1_700_000_000
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class StreamRequest:
    scenario: str
    tokens: int
    delay_ms: int
    run_id: str | None
    # The stream's ids derive from it. A client that sends X-Demo-Id chooses it, and then the
    # timestamps are fixed too: the same request gets the same bytes.
    ident: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    fixed: bool = False
    include_usage: bool = False

    def now(self) -> int:
        return FIXED_TIME if self.fixed else int(datetime.now(UTC).timestamp())

    def date(self) -> str:
        if self.fixed:
            return datetime.fromtimestamp(FIXED_TIME, UTC).isoformat()
        return datetime.now(UTC).isoformat()

    def words(self) -> list[str]:
        return [WORDS[i % len(WORDS)] + " " for i in range(self.tokens)]


def data(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def typed(payload: dict[str, Any]) -> bytes:
    """An event whose SSE event name is its payload's ``type`` (OpenAI Responses, Anthropic)."""
    return data(payload, str(payload["type"]))


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    endings: dict[str, str]  # scenario -> how it ends, for the docs and the 400 message
    chunks: Callable[[StreamRequest], Iterator[bytes]]


# -- Letta --------------------------------------------------------------------------------------


def _letta_message(req: StreamRequest, message_id: str, message_type: str, **fields: Any) -> bytes:
    payload = {"id": message_id, "date": req.date(), "message_type": message_type, **fields}
    # Null on purpose: the sidecar fills seq_id and run_id (letta dialect).
    payload.update(seq_id=None, run_id=None)
    return data(payload)


def _letta_stop(reason: str) -> bytes:
    return data({"message_type": "stop_reason", "stop_reason": reason})


def _letta_error(message: str, detail: str) -> bytes:
    payload = {
        "message_type": "error_message",
        "error_type": "llm_error",
        "message": message,
        "detail": detail,
    }
    return data(payload, "error")


def _letta_chunks(req: StreamRequest) -> Iterator[bytes]:
    yield b": ping\n\n"
    ident = req.ident
    yield _letta_message(
        req,
        f"message-{ident}-r",
        "reasoning_message",
        source="reasoner_model",
        reasoning=f"The user asked for the {req.scenario!r} demo; I will answer briefly.",
    )
    answer_id = f"message-{ident}-a"  # every chunk of one message shares its id
    for word in req.words():
        yield _letta_message(req, answer_id, "assistant_message", content=word)
    if req.scenario == "normal":
        yield _letta_stop("end_turn")
        usage = {"completion_tokens": req.tokens, "prompt_tokens": 42}
        usage |= {"total_tokens": req.tokens + 42, "step_count": 1}
        yield data({"message_type": "usage_statistics", **usage})
        yield DONE
    elif req.scenario == "error_then_done":
        yield _letta_stop("llm_api_error")
        yield _letta_error("The model provider failed", "the provider answered HTTP 529")
        yield DONE
    elif req.scenario == "error_no_done":
        yield _letta_stop("error")
        yield _letta_error("The agent step failed", "the service crashed before [DONE]")
    elif req.scenario == "stop_no_done":
        yield _letta_stop("end_turn")
    # "dies" and "reset" have no terminal at all.


LETTA = Protocol(
    "letta",
    {
        "normal": "stop_reason end_turn, usage_statistics, [DONE]",
        "error_then_done": "stop_reason llm_api_error, event: error, [DONE] (a well-behaved error)",
        "dies": "nothing: the response ends cleanly without any terminal",
        "error_no_done": "stop_reason error, event: error, clean end without [DONE]",
        "stop_no_done": "stop_reason end_turn, clean end without [DONE]",
        "reset": "nothing: the TCP connection is cut mid-stream",
    },
    _letta_chunks,
)


# -- OpenAI Chat Completions --------------------------------------------------------------------


def _chat_chunks(req: StreamRequest) -> Iterator[bytes]:
    head = {
        "id": f"chatcmpl-{req.ident}",
        "object": "chat.completion.chunk",
        "created": req.now(),
        "model": MODEL,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return data({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for word in req.words():
        yield chunk({"content": word})
    if req.scenario in ("normal", "stop_no_done"):
        yield chunk({}, "stop")
        if req.include_usage:
            usage = {"prompt_tokens": 42, "completion_tokens": req.tokens}
            yield data({**head, "choices": [], "usage": {**usage, "total_tokens": req.tokens + 42}})
        if req.scenario == "normal":
            yield DONE
    elif req.scenario in ("error_then_done", "error_no_done"):
        # What vLLM and LiteLLM send when generation fails mid-stream; the SDK raises APIError.
        error = {"message": "The model is overloaded", "type": "server_error", "param": None}
        yield data({"error": {**error, "code": "overloaded"}})
        if req.scenario == "error_then_done":
            yield DONE


OPENAI_CHAT = Protocol(
    "openai-chat",
    {
        "normal": "finish_reason stop, (usage chunk if stream_options.include_usage), [DONE]",
        "error_then_done": 'an {"error": {...}} chunk, then [DONE]',
        "dies": "nothing: the response ends cleanly without finish_reason or [DONE]",
        "error_no_done": 'an {"error": {...}} chunk, clean end without [DONE]',
        "stop_no_done": "finish_reason stop, clean end without [DONE]",
        "reset": "nothing: the TCP connection is cut mid-stream",
    },
    _chat_chunks,
)


# -- OpenAI Responses ---------------------------------------------------------------------------


def response_object(
    req: StreamRequest, status: str, output: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": f"resp_{req.ident}",
        "object": "response",
        "created_at": req.now(),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": MODEL,
        "output": output,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        **extra,
    }


def _responses_chunks(req: StreamRequest) -> Iterator[bytes]:
    number = iter(range(1 << 30))

    def event(kind: str, **fields: Any) -> bytes:
        return typed({"type": kind, "sequence_number": next(number), **fields})

    item_id = f"msg_{req.ident}"
    text = "".join(req.words())
    yield event("response.created", response=response_object(req, "in_progress", []))
    yield event("response.in_progress", response=response_object(req, "in_progress", []))
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
    yield event("response.output_item.added", output_index=0, item={**item, "content": []})
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.content_part.added", **where, part=part)
    for word in req.words():
        yield event("response.output_text.delta", **where, delta=word, logprobs=[])
    if req.scenario == "normal":
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        done_part = {**part, "text": text}
        yield event("response.content_part.done", **where, part=done_part)
        done_item = {**item, "status": "completed", "content": [done_part]}
        yield event("response.output_item.done", output_index=0, item=done_item)
        usage: dict[str, Any] = {"input_tokens": 42, "output_tokens": req.tokens}
        usage |= {"total_tokens": req.tokens + 42}
        usage |= {"input_tokens_details": {"cached_tokens": 0}}
        usage |= {"output_tokens_details": {"reasoning_tokens": 0}}
        final = response_object(req, "completed", [done_item], usage=usage)
        yield event("response.completed", response=final)
    elif req.scenario == "error_then_done":
        error = {"code": "server_error", "message": "The model provider failed mid-response"}
        yield event(
            "response.failed", response={**response_object(req, "failed", []), "error": error}
        )


OPENAI_RESPONSES = Protocol(
    "openai-responses",
    {
        "normal": "response.output_text.done ... response.completed",
        "error_then_done": "response.failed (error server_error)",
        "dies": "nothing: the response ends cleanly without a terminal event",
        "reset": "nothing: the TCP connection is cut mid-stream",
    },
    _responses_chunks,
)


# -- Anthropic Messages -------------------------------------------------------------------------


def _anthropic_chunks(req: StreamRequest) -> Iterator[bytes]:
    message: dict[str, Any] = {
        "id": f"msg_{req.ident}",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 42, "output_tokens": 1},
    }
    yield typed({"type": "message_start", "message": message})
    block = {"type": "text", "text": ""}
    yield typed({"type": "content_block_start", "index": 0, "content_block": block})
    yield typed({"type": "ping"})
    for word in req.words():
        delta = {"type": "text_delta", "text": word}
        yield typed({"type": "content_block_delta", "index": 0, "delta": delta})
    if req.scenario == "error_then_done":
        error = {"type": "overloaded_error", "message": "Overloaded"}
        yield typed({"type": "error", "error": error})
        return
    if req.scenario in ("normal", "stop_no_done"):
        yield typed({"type": "content_block_stop", "index": 0})
        stop: dict[str, Any] = {"stop_reason": "end_turn", "stop_sequence": None}
        usage = {"output_tokens": req.tokens}
        yield typed({"type": "message_delta", "delta": stop, "usage": usage})
        if req.scenario == "normal":
            yield typed({"type": "message_stop"})


ANTHROPIC = Protocol(
    "anthropic",
    {
        "normal": "content_block_stop, message_delta (stop_reason end_turn), message_stop",
        "error_then_done": "event: error (overloaded_error): a failed message ends there",
        "dies": "nothing: the response ends cleanly without message_stop",
        "stop_no_done": "message_delta (stop_reason end_turn), clean end without message_stop",
        "reset": "nothing: the TCP connection is cut mid-stream",
    },
    _anthropic_chunks,
)


# -- generic ------------------------------------------------------------------------------------


def _generic_chunks(req: StreamRequest) -> Iterator[bytes]:
    for word in req.words():
        yield data(word.strip())
    if req.scenario == "done":
        yield DONE
    elif req.scenario == "truncated":
        yield b"data: half an ev"


GENERIC = Protocol(
    "generic",
    {
        "normal": "plain text events, then a clean end (that is how this stream ends)",
        "done": "plain text events, then [DONE]",
        "truncated": "the body ends cleanly, but inside an event",
        "reset": "nothing: the TCP connection is cut mid-stream",
    },
    _generic_chunks,
)
