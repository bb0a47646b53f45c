"""The openai-chat, openai-responses, anthropic and generic trackers (``sidecar/dialects/``),
``auto`` detection, per-route overrides, and restoring a tracker from a run's meta. DESIGN.md,
"Dialects"; the letta tracker has its own file (``test_dialect_letta.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from sidecar.dialects import TRACKERS, detect, hint_for_path, new_tracker, restore_tracker
from sidecar.dialects.openai_responses import resume_cursor
from sidecar.dialects.routes import DIALECT_CHOICES, dialect_for_path, parse_routes
from sidecar.payload import parse_payload
from sidecar.sse import Event
from sidecar.terminal import (
    SILENT_END,
    Dialect,
    DialectTracker,
    EndCause,
    ForcedDone,
    Outcome,
    Status,
    Synthesized,
    Transition,
)

T = Transition
DONE = Event("[DONE]")


def ev(payload: Any, event: str | None = None) -> Event:
    return Event(payload if isinstance(payload, str) else json.dumps(payload), event=event)


def feed(tracker: DialectTracker, events: Sequence[Event]) -> list[tuple[Transition, ...]]:
    return [tracker.observe(e, parse_payload(e.data)) for e in events]


def run(
    dialect: Dialect,
    events: Sequence[Event],
    cause: EndCause = EndCause.EOF,
    detail: str | None = None,
    default_status: Status = Status.FAILED,
) -> Outcome:
    tracker = new_tracker(dialect, default_status)
    feed(tracker, events)
    return tracker.finish(cause, detail)


def synth_json(outcome: Outcome) -> list[tuple[str | None, Any]]:
    out: list[tuple[str | None, Any]] = []
    for s in outcome.synthesized:
        assert s.data is not None
        out.append((s.event, s.data if s.data == "[DONE]" else json.loads(s.data)))
    return out


def test_every_dialect_has_a_tracker_and_a_setting_value() -> None:
    assert set(TRACKERS) == set(Dialect)
    assert ("auto", *(d.value for d in Dialect)) == DIALECT_CHOICES
    for dialect, tracker in TRACKERS.items():
        assert tracker.dialect is dialect
        assert new_tracker(dialect).dialect is dialect
    assert [d for d, t in TRACKERS.items() if t.fills_ids] == [Dialect.LETTA]
    assert [d for d, t in TRACKERS.items() if t.cuts_client_on_forced] == [Dialect.GENERIC]


# -- openai-chat ----------------------------------------------------------------------------

CHAT_HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(text: str = "hi", finish: str | None = None) -> Event:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return ev({**CHAT_HEAD, "choices": [choice]})


CHAT_ERROR = ev({"error": {"message": "overloaded", "type": "server_error", "code": None}})
USAGE = ev({**CHAT_HEAD, "choices": [], "usage": {"total_tokens": 3}})


def test_chat_transitions_and_meta() -> None:
    tracker = new_tracker(Dialect.OPENAI_CHAT)
    assert feed(tracker, [chunk(), chunk("", "stop"), USAGE, DONE]) == [
        (),
        (T.SAW_STOP_REASON,),
        (),
        (T.SAW_DONE,),
    ]
    assert tracker.protocol_id == "chatcmpl-1"
    assert tracker.take_meta() == {"protocol_id": "chatcmpl-1", "stop_reason": "stop"}
    assert tracker.take_meta() is None
    assert tracker.events == 4


@pytest.mark.parametrize(
    "reason", ["stop", "tool_calls", "function_call", "length", "content_filter"]
)
def test_chat_finish_reasons_complete(reason: str) -> None:
    outcome = run(Dialect.OPENAI_CHAT, [chunk(), chunk("", reason), DONE])
    assert (outcome.status, outcome.stop_reason, outcome.forced_done) == (
        Status.COMPLETED,
        reason,
        None,
    )
    assert outcome.synthesized == ()
    assert outcome.stop_reason_label == reason


def test_chat_unknown_finish_reason_is_completed_and_labelled_other() -> None:
    outcome = run(Dialect.OPENAI_CHAT, [chunk("", "eos_token"), DONE])
    assert (outcome.status, outcome.stop_reason_label) == (Status.COMPLETED, "other")


@pytest.mark.parametrize("default", [Status.FAILED, Status.COMPLETED])
def test_chat_done_without_finish_reason_takes_the_setting(default: Status) -> None:
    outcome = run(Dialect.OPENAI_CHAT, [chunk(), DONE], default_status=default)
    assert (outcome.status, outcome.forced_done, outcome.stop_reason_label) == (
        default,
        None,
        "none",
    )


def test_chat_error_chunk_then_done_is_a_natural_failed_end_with_its_error() -> None:
    tracker = new_tracker(Dialect.OPENAI_CHAT, Status.COMPLETED)
    assert feed(tracker, [chunk(), CHAT_ERROR, DONE]) == [
        (),
        (T.SAW_ERROR,),
        (T.SAW_DONE, T.SAW_DONE_AFTER_ERROR),
    ]
    outcome = tracker.finish(EndCause.UPSTREAM_ERROR)
    assert (outcome.status, outcome.forced_done, outcome.synthesized) == (Status.FAILED, None, ())
    assert outcome.error == {"message": "overloaded", "type": "server_error", "code": None}


def test_chat_null_error_is_not_an_error() -> None:
    tracker = new_tracker(Dialect.OPENAI_CHAT)
    assert feed(tracker, [ev({**CHAT_HEAD, "error": None, "choices": []})]) == [()]
    assert tracker.saw_error is False


@pytest.mark.parametrize(
    ("events", "cause", "status", "stop_reason", "forced", "synth"),
    [
        ([chunk("", "stop")], EndCause.EOF, Status.COMPLETED, "stop", "missing_done", ["[DONE]"]),
        ([CHAT_ERROR], EndCause.EOF, Status.FAILED, None, "missing_done_after_error", ["[DONE]"]),
        ([chunk()], EndCause.EOF, Status.FAILED, None, "stream_incomplete", ["error", "[DONE]"]),
        ([], EndCause.UPSTREAM_ERROR, Status.FAILED, None, "upstream_error", ["error", "[DONE]"]),
        ([CHAT_ERROR], EndCause.UPSTREAM_TIMEOUT, Status.FAILED, None, "upstream_timeout",
         ["[DONE]"]),
        ([chunk("", "length")], EndCause.PRODUCER_LOST, Status.FAILED, "length", "producer_lost",
         ["error", "[DONE]"]),
        ([chunk()], EndCause.CANCELLED, Status.CANCELLED, None, "cancelled", ["error", "[DONE]"]),
        ([chunk("", "stop")], EndCause.CANCELLED, Status.COMPLETED, "stop", "cancelled",
         ["[DONE]"]),
    ],
)  # fmt: skip
def test_chat_forced_ends(
    events: list[Event],
    cause: EndCause,
    status: Status,
    stop_reason: str | None,
    forced: str,
    synth: list[str],
) -> None:
    outcome = run(Dialect.OPENAI_CHAT, events, cause, detail="boom")
    assert (outcome.status, outcome.stop_reason, outcome.forced_done) == (
        status,
        stop_reason,
        ForcedDone(forced),
    )
    got = synth_json(outcome)
    assert ["[DONE]" if d == "[DONE]" else "error" for _, d in got] == synth
    assert all(event is None for event, _ in got)  # chat events are all plain data events
    if "error" in synth:
        error = got[0][1]["error"]
        assert error == {"message": error["message"], "type": cause.value, "param": None,
                         "code": None}  # fmt: skip
        assert error["message"].startswith(f"sse-sidecar: {cause.value}: ")
        assert error["message"].endswith(" (boom)")
        assert outcome.error == error


# -- openai-responses -----------------------------------------------------------------------

RESP = {"id": "resp_1", "object": "response", "created_at": 7, "model": "gpt-x", "output": []}


def rev(n: int, kind: str, **fields: Any) -> Event:
    return ev({"type": kind, "sequence_number": n, **fields}, kind)


CREATED = rev(0, "response.created", response={**RESP, "status": "in_progress"})
DELTA = rev(1, "response.output_text.delta", delta="hi", item_id="m", output_index=0)


def test_responses_terminals() -> None:
    tracker = new_tracker(Dialect.OPENAI_RESPONSES)
    assert feed(tracker, [CREATED, DELTA]) == [(), ()]
    assert tracker.protocol_id == "resp_1"
    meta = tracker.take_meta()
    assert meta is not None
    assert meta["protocol_id"] == "resp_1"
    assert json.loads(meta["dialect_state"]) == {"offset": 1, "model": "gpt-x", "created_at": 7}
    done = rev(2, "response.completed", response={**RESP, "status": "completed"})
    assert feed(tracker, [done, DELTA]) == [(T.SAW_DONE,), ()]
    assert tracker.take_meta() == {"stop_reason": "completed"}
    outcome = tracker.finish()
    assert (outcome.status, outcome.stop_reason, outcome.forced_done) == (
        Status.COMPLETED,
        "completed",
        None,
    )


@pytest.mark.parametrize(
    ("terminal", "status", "stop_reason", "error"),
    [
        (
            rev(2, "response.incomplete",
                response={**RESP, "incomplete_details": {"reason": "max_output_tokens"}}),
            Status.COMPLETED, "max_output_tokens", None,
        ),
        (
            rev(2, "response.incomplete", response={**RESP, "incomplete_details": None}),
            Status.COMPLETED, "incomplete", None,
        ),
        (
            rev(2, "response.failed",
                response={**RESP, "error": {"code": "server_error", "message": "x"}}),
            Status.FAILED, "failed", {"code": "server_error", "message": "x"},
        ),
        (
            rev(2, "error", code="rate_limit_exceeded", message="slow down", param=None),
            Status.FAILED, "error", {"code": "rate_limit_exceeded", "message": "slow down",
                                     "param": None},
        ),
    ],
)  # fmt: skip
def test_responses_other_terminals(
    terminal: Event, status: Status, stop_reason: str, error: Any
) -> None:
    tracker = new_tracker(Dialect.OPENAI_RESPONSES)
    transitions = feed(tracker, [CREATED, DELTA, terminal])
    expected = (T.SAW_DONE,) if error is None else (T.SAW_ERROR, T.SAW_DONE, T.SAW_DONE_AFTER_ERROR)
    assert transitions[-1] == expected
    outcome = tracker.finish(EndCause.UPSTREAM_ERROR)
    assert (outcome.status, outcome.stop_reason, outcome.error, outcome.forced_done) == (
        status,
        stop_reason,
        error,
        None,
    )
    assert outcome.synthesized == ()


@pytest.mark.parametrize(
    ("cause", "status", "reason"),
    [
        (EndCause.EOF, "failed", "stream_incomplete"),
        (EndCause.UPSTREAM_ERROR, "failed", "upstream_error"),
        (EndCause.SIDECAR_SHUTDOWN, "failed", "sidecar_shutdown"),
        (EndCause.CANCELLED, "cancelled", "cancelled"),
    ],
)
def test_responses_forced_end_is_response_failed_for_the_named_response(
    cause: EndCause, status: str, reason: str
) -> None:
    outcome = run(Dialect.OPENAI_RESPONSES, [CREATED, DELTA], cause)
    assert outcome.forced_done == ForcedDone(reason)
    assert outcome.status == Status(status)
    [(event, payload)] = synth_json(outcome)
    assert event == "response.failed"
    message = f"sse-sidecar: {reason}: " + payload["response"]["error"]["message"].split(": ", 2)[2]
    error = {"code": "server_error", "message": message, "type": reason}
    assert payload == {
        "type": "response.failed",
        "sequence_number": 2,
        "response": {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-x",
            "created_at": 7,
            "status": status,
            "error": error,
            "incomplete_details": None,
            "output": [],
        },
    }
    assert outcome.error == error


def test_responses_forced_end_before_the_response_was_named_is_an_error_event() -> None:
    outcome = run(Dialect.OPENAI_RESPONSES, [], EndCause.UPSTREAM_TIMEOUT)
    [(event, payload)] = synth_json(outcome)
    assert event == "error"
    assert payload["type"] == "error"
    assert payload["sequence_number"] == 0
    assert (payload["code"], payload["type"], payload["param"]) == ("server_error", "error", None)
    assert payload["message"].startswith("sse-sidecar: upstream_timeout: ")
    assert (outcome.stop_reason, outcome.status) == ("error", Status.FAILED)


def test_responses_sequence_numbers_that_do_not_start_at_zero_are_continued() -> None:
    tracker = new_tracker(Dialect.OPENAI_RESPONSES)
    created = rev(100, "response.created", response=RESP)
    feed(tracker, [created, rev(101, "x"), Event(": not json"), rev(105, "y")])
    meta = tracker.take_meta()
    assert meta is not None
    assert json.loads(meta["dialect_state"])["offset"] == 4 - 105
    [(_, payload)] = synth_json(tracker.finish())
    assert payload["sequence_number"] == 106
    assert resume_cursor(meta["dialect_state"], 101) == 0
    assert resume_cursor(meta["dialect_state"], 105) == 4


def test_responses_resume_cursor() -> None:
    # The default: OpenAI numbers from 0, the sidecar's seq from 1.
    assert resume_cursor(None, 0) == 1
    assert resume_cursor('{"offset": 1}', 9) == 10
    assert resume_cursor('{"offset": -20}', 3) == 0
    assert resume_cursor("not json", 4) == 5


# -- anthropic ------------------------------------------------------------------------------

MSG_START = ev({"type": "message_start", "message": {"id": "msg_1", "type": "message"}},
               "message_start")  # fmt: skip
BLOCK = ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                                 "text": "a"}},
           "content_block_delta")  # fmt: skip
PING = ev({"type": "ping"}, "ping")


def delta(reason: str) -> Event:
    return ev({"type": "message_delta", "delta": {"stop_reason": reason}}, "message_delta")


STOP = ev({"type": "message_stop"}, "message_stop")
OVERLOADED = ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                "error")  # fmt: skip


def test_anthropic_natural_end() -> None:
    tracker = new_tracker(Dialect.ANTHROPIC)
    assert feed(tracker, [MSG_START, PING, BLOCK, delta("end_turn"), STOP]) == [
        (),
        (),
        (),
        (T.SAW_STOP_REASON,),
        (T.SAW_DONE,),
    ]
    assert tracker.take_meta() == {"protocol_id": "msg_1", "stop_reason": "end_turn"}
    outcome = tracker.finish(EndCause.UPSTREAM_ERROR)
    assert (outcome.status, outcome.stop_reason, outcome.forced_done, outcome.synthesized) == (
        Status.COMPLETED,
        "end_turn",
        None,
        (),
    )


@pytest.mark.parametrize(
    "reason",
    ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"],
)
def test_anthropic_stop_reasons_complete(reason: str) -> None:
    outcome = run(Dialect.ANTHROPIC, [MSG_START, delta(reason), STOP])
    assert (outcome.status, outcome.stop_reason_label) == (Status.COMPLETED, reason)


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (OVERLOADED, {"type": "overloaded_error", "message": "Overloaded"}),
        (Event("upstream exploded", event="error"), {"message": "upstream exploded"}),
        (ev({"type": "error", "error": {"type": "api_error"}}), {"type": "api_error"}),
    ],
)
def test_anthropic_error_event_is_the_terminal_of_a_failed_message(
    event: Event, error: Any
) -> None:
    tracker = new_tracker(Dialect.ANTHROPIC)
    assert feed(tracker, [MSG_START, BLOCK, event, STOP]) == [
        (),
        (),
        (T.SAW_ERROR, T.SAW_DONE, T.SAW_DONE_AFTER_ERROR),
        (),
    ]
    outcome = tracker.finish(EndCause.UPSTREAM_ERROR)
    assert (outcome.status, outcome.error, outcome.forced_done, outcome.synthesized) == (
        Status.FAILED,
        error,
        None,
        (),
    )


@pytest.mark.parametrize(
    ("events", "cause", "status", "forced", "appended"),
    [
        ([MSG_START, delta("max_tokens")], EndCause.EOF, "completed", "missing_done", "stop"),
        ([MSG_START, delta("end_turn")], EndCause.CANCELLED, "completed", "cancelled", "stop"),
        ([MSG_START, BLOCK], EndCause.EOF, "failed", "stream_incomplete", "error"),
        ([], EndCause.UPSTREAM_ERROR, "failed", "upstream_error", "error"),
        ([MSG_START, delta("end_turn")], EndCause.PRODUCER_LOST, "failed", "producer_lost",
         "error"),
        ([MSG_START], EndCause.CANCELLED, "cancelled", "cancelled", "error"),
    ],
)  # fmt: skip
def test_anthropic_forced_ends(
    events: list[Event], cause: EndCause, status: str, forced: str, appended: str
) -> None:
    outcome = run(Dialect.ANTHROPIC, events, cause)
    assert (outcome.status, outcome.forced_done) == (Status(status), ForcedDone(forced))
    [(event, payload)] = synth_json(outcome)
    if appended == "stop":
        assert (event, payload) == ("message_stop", {"type": "message_stop"})
        assert outcome.error is None
    else:
        assert event == "error"
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "api_error"
        assert payload["error"]["message"].startswith(f"sse-sidecar: {forced}: ")
        assert outcome.error == payload["error"]


# -- generic --------------------------------------------------------------------------------


def test_generic_clean_close_is_its_natural_end_with_a_silent_stored_end() -> None:
    outcome = run(Dialect.GENERIC, [Event("a"), Event("b")])
    assert (outcome.status, outcome.forced_done, outcome.saw_done) == (Status.COMPLETED, None, True)
    assert outcome.synthesized == (SILENT_END,)
    assert outcome.silent_end
    assert (outcome.stop_reason, outcome.error, outcome.stop_reason_label) == (None, None, "none")


def test_generic_done_is_its_natural_end_with_nothing_appended() -> None:
    tracker = new_tracker(Dialect.GENERIC)
    assert feed(tracker, [Event("a"), DONE, Event("late")]) == [(), (T.SAW_DONE,), ()]
    outcome = tracker.finish(EndCause.UPSTREAM_ERROR)
    assert (outcome.status, outcome.forced_done, outcome.synthesized) == (
        Status.COMPLETED,
        None,
        (),
    )
    assert not outcome.silent_end


@pytest.mark.parametrize(
    ("cause", "partial", "status", "forced"),
    [
        (EndCause.EOF, True, Status.FAILED, "stream_incomplete"),
        (EndCause.UPSTREAM_ERROR, False, Status.FAILED, "upstream_error"),
        (EndCause.UPSTREAM_TIMEOUT, False, Status.FAILED, "upstream_timeout"),
        (EndCause.SIDECAR_SHUTDOWN, False, Status.FAILED, "sidecar_shutdown"),
        (EndCause.PRODUCER_LOST, False, Status.FAILED, "producer_lost"),
        (EndCause.CANCELLED, False, Status.CANCELLED, "cancelled"),
    ],
)
def test_generic_forced_ends_append_nothing_but_record_the_reason(
    cause: EndCause, partial: bool, status: Status, forced: str
) -> None:
    tracker = new_tracker(Dialect.GENERIC)
    feed(tracker, [Event("a"), ev({"error": {"message": "not generic's vocabulary"}})])
    tracker.partial_event = partial
    outcome = tracker.finish(cause, "why")
    assert (outcome.status, outcome.forced_done) == (status, ForcedDone(forced))
    assert outcome.synthesized == (SILENT_END,)
    error = outcome.error
    assert isinstance(error, dict)
    assert error == {"type": forced, "message": error["message"]}
    assert error["message"].endswith("(why)")
    assert outcome.saw_error is False


# -- shared: idempotence, restore from meta ---------------------------------------------------


@pytest.mark.parametrize("dialect", list(Dialect))
def test_finish_is_idempotent(dialect: Dialect) -> None:
    tracker = new_tracker(dialect)
    first = tracker.finish(EndCause.UPSTREAM_ERROR, "x")
    assert tracker.finish(EndCause.EOF) is first


STREAMS: dict[Dialect, list[Event]] = {
    Dialect.LETTA: [ev({"message_type": "assistant_message", "run_id": "r-up"})],
    Dialect.OPENAI_CHAT: [chunk(), chunk("", "length")],
    Dialect.OPENAI_RESPONSES: [rev(3, "response.created", response=RESP), rev(4, "d")],
    Dialect.ANTHROPIC: [MSG_START, BLOCK, delta("tool_use")],
    Dialect.GENERIC: [Event("a")],
}


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("cause", [EndCause.PRODUCER_LOST, EndCause.CANCELLED, EndCause.EOF])
def test_a_tracker_restored_from_the_meta_ends_the_run_as_the_live_one_would(
    dialect: Dialect, cause: EndCause
) -> None:
    """The orphan finalizer has only the run's meta: what the tee wrote with the events."""
    live = new_tracker(dialect)
    meta: dict[str, str] = {"dialect": dialect.value}
    for event in STREAMS[dialect]:
        live.observe(event, parse_payload(event.data))
        meta |= live.take_meta() or {}
    restored = restore_tracker(
        meta["dialect"],
        stop_reason=meta.get("stop_reason"),
        error=json.loads(meta["error"]) if "error" in meta else None,
        last_seq=len(STREAMS[dialect]),
        protocol_id=meta.get("protocol_id"),
        dialect_state=meta.get("dialect_state"),
    )
    assert type(restored) is type(live)
    assert restored.finish(cause) == live.finish(cause)


def test_restore_of_a_run_stored_before_dialects_is_letta_and_unknown_is_generic() -> None:
    kwargs: dict[str, Any] = {
        "stop_reason": None,
        "error": None,
        "last_seq": 0,
        "protocol_id": None,
        "dialect_state": None,
    }
    assert restore_tracker(None, **kwargs).dialect is Dialect.LETTA
    assert restore_tracker("klingon", **kwargs).dialect is Dialect.GENERIC
    assert restore_tracker("anthropic", **{**kwargs, "dialect_state": "{bad"}).dialect is (
        Dialect.ANTHROPIC
    )


def test_synthesized_events_never_contain_a_newline() -> None:
    """Each is one data line: the stored bytes and the SDKs' decoders see one event."""
    for dialect in Dialect:
        for cause in EndCause:
            outcome = run(dialect, STREAMS[dialect], cause, detail="a\nb\r\nc")
            for s in outcome.synthesized:
                assert s.data is None or ("\n" not in s.data and "\r" not in s.data)


# -- auto detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "hint", "expected"),
    [
        (ev({"message_type": "assistant_message"}), None, Dialect.LETTA),
        (ev({"message_type": "error_message"}, "error"), Dialect.OPENAI_CHAT, Dialect.LETTA),
        (chunk(), None, Dialect.OPENAI_CHAT),
        (ev({"id": "x", "choices": []}), Dialect.ANTHROPIC, Dialect.OPENAI_CHAT),
        (CHAT_ERROR, None, Dialect.OPENAI_CHAT),
        (CREATED, None, Dialect.OPENAI_RESPONSES),
        (ev({"type": "response.in_progress"}), None, Dialect.OPENAI_RESPONSES),
        (rev(0, "error", code="x", message="y"), None, Dialect.OPENAI_RESPONSES),
        (MSG_START, None, Dialect.ANTHROPIC),
        (PING, None, Dialect.ANTHROPIC),
        (OVERLOADED, None, Dialect.ANTHROPIC),
        # Nothing decisive in the shape: the path's hint, else generic.
        (DONE, Dialect.LETTA, Dialect.LETTA),
        (DONE, None, Dialect.GENERIC),
        (Event("plain text"), Dialect.OPENAI_CHAT, Dialect.OPENAI_CHAT),
        (Event("plain text"), None, Dialect.GENERIC),
        (ev({"type": "error", "message": "?"}), None, Dialect.GENERIC),
        (ev({"hello": "world"}), None, Dialect.GENERIC),
        (ev([1, 2]), Dialect.ANTHROPIC, Dialect.ANTHROPIC),
        (Event("oops", event="error"), None, Dialect.GENERIC),
    ],
)
def test_detect(event: Event, hint: Dialect | None, expected: Dialect) -> None:
    assert detect(event, parse_payload(event.data), hint) is expected


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/v1/chat/completions", Dialect.OPENAI_CHAT),
        ("/openai/deployments/gpt/chat/completions/", Dialect.OPENAI_CHAT),
        ("/v1/responses", Dialect.OPENAI_RESPONSES),
        ("/v1/responses/resp_123", Dialect.OPENAI_RESPONSES),
        ("/v1/messages", Dialect.ANTHROPIC),
        ("/v1/agents/agent-1/messages/stream", Dialect.LETTA),
        ("/v1/agents/agent-1/messages", Dialect.LETTA),
        ("/v1/stream", None),
        ("/", None),
        ("/v1/completions", None),
    ],
)
def test_hint_for_path(path: str, hint: Dialect | None) -> None:
    assert hint_for_path(path) is hint


# -- per-route overrides --------------------------------------------------------------------


def test_parse_routes_and_first_match_wins() -> None:
    routes = parse_routes(" /v1/chat/*=openai-chat , /v1/*=generic,,/agents/*/stream=letta ")
    assert routes == (
        ("/v1/chat/*", "openai-chat"),
        ("/v1/*", "generic"),
        ("/agents/*/stream", "letta"),
    )
    assert dialect_for_path(routes, "auto", "/v1/chat/completions") == "openai-chat"
    assert dialect_for_path(routes, "auto", "/v1/messages") == "generic"
    assert dialect_for_path(routes, "auto", "/agents/a/b/stream") == "letta"
    assert dialect_for_path(routes, "auto", "/other") == "auto"
    assert dialect_for_path((), "anthropic", "/v1/chat/completions") == "anthropic"
    assert parse_routes("") == ()
    assert parse_routes("*=auto") == (("*", "auto"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/v1/chat", "item 1 ('/v1/chat') must be <path glob>=<dialect>"),
        ("/a=letta,=openai-chat", "item 2 ('=openai-chat') must be <path glob>=<dialect>"),
        ("/a=", "must be <path glob>=<dialect>"),
        ("v1/*=letta", "item 1: the path glob 'v1/*' must start with / or *"),
        ("/a=letta,/b=openai", "item 2: unknown dialect 'openai'; one of auto, letta, openai-chat"),
    ],
)
def test_parse_routes_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:  # noqa: PT011 (the message is checked below)
        parse_routes(text)
    assert message in str(caught.value)


def test_synthesized_is_what_the_tee_stores() -> None:
    assert Synthesized(data=None) == SILENT_END
