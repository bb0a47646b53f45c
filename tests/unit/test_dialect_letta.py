"""The letta dialect's tracker (sidecar/dialects/letta.py on the core of sidecar/terminal.py):
DESIGN.md, "The run and its terminal"."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dialects.letta import STOP_REASON_STATUS, run_status
from sidecar.dialects.letta import LettaTracker as Tracker
from sidecar.payload import parse_payload
from sidecar.sse import Event, SSEDecoder, encode_event
from sidecar.terminal import (
    DONE_DATA,
    Dialect,
    EndCause,
    ForcedDone,
    Outcome,
    Status,
    Synthesized,
    Transition,
    is_done,
    stop_reason_label,
)

# --- building blocks -------------------------------------------------------------------------

ERROR_PAYLOAD: dict[str, Any] = {
    "message_type": "error_message",
    "error_type": "llm_error",
    "message": "the model exploded",
}
SECOND_ERROR_PAYLOAD: dict[str, Any] = {"message_type": "error_message", "error_type": "second"}

DONE = Event(data="[DONE]")
ERR = Event(data=json.dumps(ERROR_PAYLOAD), event="error")
ERR2 = Event(data=json.dumps(SECOND_ERROR_PAYLOAD), event="error")
ERR_TEXT = Event(data="upstream exploded", event="error")
MSG = Event(data='{"message_type":"assistant_message","content":"hello"}')
REASONING = Event(data='{"message_type":"reasoning_message","reasoning":"hmm"}')


def sr(reason: object) -> Event:
    return Event(data=json.dumps({"message_type": "stop_reason", "stop_reason": reason}))


def feed(tracker: Tracker, events: Sequence[Event]) -> list[tuple[Transition, ...]]:
    return [tracker.observe(e, parse_payload(e.data)) for e in events]


def run(
    events: Sequence[Event],
    cause: EndCause = EndCause.EOF,
    detail: str | None = None,
    default_status: Status = Status.FAILED,
) -> Outcome:
    tracker = Tracker(default_status=default_status)
    feed(tracker, events)
    return tracker.finish(cause, detail)


def text(synth: Synthesized) -> str:
    """The bytes of a synthesized event (letta never appends an end without bytes)."""
    assert synth.data is not None
    return synth.data


def kinds(synth: Sequence[Synthesized]) -> list[str]:
    """A compact description of synthesized events: done / stop_reason:X / error:TYPE."""
    out: list[str] = []
    for s in synth:
        if s.event == "error":
            out.append(f"error:{json.loads(text(s))['error_type']}")
        elif s.data == "[DONE]":
            assert s.event is None
            out.append("done")
        else:
            assert s.event is None
            payload = json.loads(text(s))
            assert set(payload) == {"message_type", "stop_reason"}
            assert payload["message_type"] == "stop_reason"
            out.append(f"stop_reason:{payload['stop_reason']}")
    return out


def synthesized_error(outcome: Outcome) -> dict[str, Any]:
    [err] = [s for s in outcome.synthesized if s.event == "error"]
    payload = json.loads(text(err))
    assert isinstance(payload, dict)
    return payload


FAILURE_CAUSES = [
    EndCause.UPSTREAM_ERROR,
    EndCause.UPSTREAM_TIMEOUT,
    EndCause.SIDECAR_SHUTDOWN,
    EndCause.PRODUCER_LOST,
]

COMPLETED_REASONS = ["end_turn", "max_steps", "tool_rule", "requires_approval"]
CANCELLED_REASONS = ["cancelled"]
FAILED_REASONS = [
    "error",
    "llm_api_error",
    "invalid_llm_response",
    "invalid_tool_call",
    "no_tool_call",
    "max_tokens_exceeded",
    "insufficient_credits",
    "context_window_overflow_in_system_prompt",
]
DESIGN_STATUS_TABLE = (
    [(r, Status.COMPLETED) for r in COMPLETED_REASONS]
    + [(r, Status.CANCELLED) for r in CANCELLED_REASONS]
    + [(r, Status.FAILED) for r in FAILED_REASONS]
)


# --- names that dashboards and metrics use verbatim ------------------------------------------


def test_enum_values_are_the_design_names() -> None:
    assert [t.value for t in Transition] == [
        "saw_stop_reason",
        "saw_error",
        "saw_done",
        "saw_done_after_error",
    ]
    assert {f.value for f in ForcedDone} == {
        "missing_done",
        "missing_done_after_error",
        "stream_incomplete",
        "upstream_error",
        "upstream_timeout",
        "cancelled",
        "sidecar_shutdown",
        "producer_lost",
    }
    assert {s.value for s in Status} == {"running", "completed", "failed", "cancelled"}
    assert EndCause.EOF.value == "stream_incomplete"
    assert {c.value for c in EndCause} == {
        "stream_incomplete",
        "upstream_error",
        "upstream_timeout",
        "cancelled",
        "sidecar_shutdown",
        "producer_lost",
    }
    # Every cause is also a forced_done reason of the same name.
    for cause in EndCause:
        assert ForcedDone(cause.value).value == cause.value
    assert DONE_DATA == "[DONE]"


# --- observe: transitions --------------------------------------------------------------------


def test_error_event_with_json_payload() -> None:
    tracker = Tracker()
    assert tracker.observe(ERR, parse_payload(ERR.data)) == (Transition.SAW_ERROR,)
    assert tracker.saw_error is True
    assert tracker.error == ERROR_PAYLOAD
    assert tracker.saw_done is False
    assert tracker.stop_reason is None


@pytest.mark.parametrize(
    "data",
    ["upstream exploded", "42", '"a json string"', "null", "{not json", "[DONE]", ""],
)
def test_error_event_with_non_object_payload_keeps_raw_text(data: str) -> None:
    tracker = Tracker()
    event = Event(data=data, event="error")
    assert tracker.observe(event, parse_payload(data)) == (Transition.SAW_ERROR,)
    assert tracker.error == {"message": data}
    assert tracker.saw_error is True
    assert tracker.saw_done is False


def test_error_event_with_json_array_payload() -> None:
    tracker = Tracker()
    event = Event(data='[{"code": 1}]', event="error")
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_ERROR,)
    assert tracker.error == [{"code": 1}]


def test_first_error_wins() -> None:
    tracker = Tracker()
    assert feed(tracker, [ERR, ERR2, ERR_TEXT]) == [(Transition.SAW_ERROR,)] * 3
    assert tracker.error == ERROR_PAYLOAD


def test_first_error_wins_when_it_was_plain_text() -> None:
    tracker = Tracker()
    feed(tracker, [ERR_TEXT, ERR])
    assert tracker.error == {"message": "upstream exploded"}


def test_error_event_carrying_a_stop_reason_payload_is_an_error() -> None:
    tracker = Tracker()
    event = Event(data='{"message_type":"stop_reason","stop_reason":"end_turn"}', event="error")
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_ERROR,)
    assert tracker.stop_reason is None
    assert tracker.error == {"message_type": "stop_reason", "stop_reason": "end_turn"}


def test_stop_reason() -> None:
    tracker = Tracker()
    event = sr("end_turn")
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_STOP_REASON,)
    assert tracker.stop_reason == "end_turn"
    assert tracker.saw_error is False
    assert tracker.saw_done is False


def test_stop_reason_in_a_named_event() -> None:
    tracker = Tracker()
    event = Event(data='{"message_type": "stop_reason", "stop_reason": "max_steps"}', event="msg")
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_STOP_REASON,)
    assert tracker.stop_reason == "max_steps"


@pytest.mark.parametrize("reason", [None, 42, 1.5, True, ["end_turn"], {"end_turn": 1}])
def test_non_string_stop_reason_becomes_other(reason: object) -> None:
    tracker = Tracker()
    event = sr(reason)
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_STOP_REASON,)
    assert tracker.stop_reason == "other"


def test_stop_reason_message_without_the_field_becomes_other() -> None:
    tracker = Tracker()
    event = Event(data='{"message_type":"stop_reason"}')
    assert tracker.observe(event, parse_payload(event.data)) == (Transition.SAW_STOP_REASON,)
    assert tracker.stop_reason == "other"


def test_unknown_string_stop_reason_is_kept_verbatim() -> None:
    tracker = Tracker()
    feed(tracker, [sr("brand_new_reason")])
    assert tracker.stop_reason == "brand_new_reason"


def test_later_stop_reason_replaces_earlier() -> None:
    tracker = Tracker()
    feed(tracker, [sr("end_turn"), sr("max_steps")])
    assert tracker.stop_reason == "max_steps"


def test_done() -> None:
    tracker = Tracker()
    assert tracker.observe(DONE, parse_payload(DONE.data)) == (Transition.SAW_DONE,)
    assert tracker.saw_done is True
    assert tracker.saw_error is False


def test_done_after_error() -> None:
    tracker = Tracker()
    assert feed(tracker, [sr("error"), ERR, DONE]) == [
        (Transition.SAW_STOP_REASON,),
        (Transition.SAW_ERROR,),
        (Transition.SAW_DONE, Transition.SAW_DONE_AFTER_ERROR),
    ]
    assert tracker.saw_done is True
    assert tracker.saw_error is True


def test_done_in_a_named_non_error_event() -> None:
    tracker = Tracker()
    assert feed(tracker, [Event(data="[DONE]", event="message")]) == [(Transition.SAW_DONE,)]


def test_done_payload_defaults_to_none() -> None:
    tracker = Tracker()
    assert tracker.observe(DONE) == (Transition.SAW_DONE,)


@pytest.mark.parametrize(
    "late",
    [ERR, ERR_TEXT, sr("end_turn"), sr("error"), DONE, MSG, Event(data="[DONE]", event="x")],
)
def test_everything_after_done_is_ignored(late: Event) -> None:
    tracker = Tracker()
    feed(tracker, [sr("end_turn"), DONE])
    assert tracker.observe(late, parse_payload(late.data)) == ()
    assert tracker.stop_reason == "end_turn"
    assert tracker.saw_error is False
    assert tracker.error is None
    assert tracker.saw_done is True
    outcome = tracker.finish()
    assert outcome.status is Status.COMPLETED
    assert outcome.forced_done is None
    assert outcome.synthesized == ()


@pytest.mark.parametrize("name", [None, "error", "message", "ping"])
def test_event_without_data_is_ignored(name: str | None) -> None:
    tracker = Tracker()
    assert tracker.observe(Event(data=None, event=name, id="7", retry=10)) == ()
    assert tracker.saw_error is False
    assert tracker.error is None
    assert tracker.saw_done is False
    assert tracker.stop_reason is None


@pytest.mark.parametrize(
    "data",
    [
        # Message text that merely *mentions* terminals is not a terminal.
        '{"message_type":"assistant_message","content":"data: [DONE]"}',
        '{"message_type":"assistant_message","content":"[DONE]"}',
        '{"message_type":"assistant_message","content":"stop_reason end_turn"}',
        '{"message_type":"assistant_message",'
        '"content":"{\\"message_type\\": \\"stop_reason\\", \\"stop_reason\\": \\"error\\"}"}',
        '{"message_type":"assistant_message","content":"event: error\\ndata: boom"}',
        # A stop_reason object nested anywhere but the top level.
        '{"message_type":"assistant_message","inner":{"message_type":"stop_reason",'
        '"stop_reason":"end_turn"}}',
        '[{"message_type":"stop_reason","stop_reason":"end_turn"}]',
        '{"stop_reason":"end_turn"}',
        '{"message_type":"stop_reasons","stop_reason":"end_turn"}',
        # Text close to, but not, the done marker.
        "data: [DONE]",
        "not [DONE]",
        "[DONE]\n[DONE]",
        '"[DONE]"',
        "[done]",
        "DONE",
        '["[DONE]"]',
        "stop_reason",
        "event: error",
        "",
    ],
)
def test_substrings_are_not_terminals(data: str) -> None:
    tracker = Tracker()
    assert tracker.observe(Event(data=data), parse_payload(data)) == ()
    assert tracker.saw_done is False
    assert tracker.saw_error is False
    assert tracker.stop_reason is None
    assert tracker.error is None


@pytest.mark.parametrize("data", ["[DONE] ", " [DONE]", "[DONE]\t"])
def test_whitespace_around_the_done_marker_is_tolerated(data: str) -> None:
    tracker = Tracker()
    assert tracker.observe(Event(data=data), parse_payload(data)) == (Transition.SAW_DONE,)


def test_message_containing_done_text_then_eof_is_incomplete() -> None:
    outcome = run([Event(data='{"message_type":"assistant_message","content":"data: [DONE]"}')])
    assert outcome.saw_done is False
    assert outcome.forced_done is ForcedDone.STREAM_INCOMPLETE
    assert outcome.status is Status.FAILED


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (DONE, True),
        (Event(data="[DONE]", event="message"), True),
        (Event(data="[DONE]", event="error"), False),
        (Event(data=None), False),
        (Event(data="[DONE]x"), False),
        (Event(data='"[DONE]"'), False),
        (MSG, False),
    ],
)
def test_is_done(event: Event, expected: bool) -> None:
    assert is_done(event) is expected


# --- finish: the DESIGN terminal table ------------------------------------------------------


def test_natural_done_with_stop_reason() -> None:
    outcome = run([MSG, sr("end_turn"), DONE])
    assert outcome == Outcome(
        dialect=Dialect.LETTA,
        status=Status.COMPLETED,
        stop_reason="end_turn",
        error=None,
        forced_done=None,
        synthesized=(),
        saw_error=False,
        saw_done=True,
        stop_reason_label="end_turn",
    )


@pytest.mark.parametrize("cause", list(EndCause))
def test_cause_is_irrelevant_after_natural_done(cause: EndCause) -> None:
    outcome = run([sr("end_turn"), DONE], cause, detail="ignored")
    assert outcome.forced_done is None
    assert outcome.synthesized == ()
    assert outcome.status is Status.COMPLETED
    assert outcome.stop_reason == "end_turn"
    assert outcome.error is None


@pytest.mark.parametrize("cause", list(EndCause))
def test_the_lesson_error_then_done_is_a_natural_end(cause: EndCause) -> None:
    """stop_reason -> event: error -> [DONE]: no forced [DONE], nothing appended, failed."""
    tracker = Tracker()
    assert feed(tracker, [MSG, sr("error"), ERR, DONE]) == [
        (),
        (Transition.SAW_STOP_REASON,),
        (Transition.SAW_ERROR,),
        (Transition.SAW_DONE, Transition.SAW_DONE_AFTER_ERROR),
    ]
    outcome = tracker.finish(cause)
    assert outcome == Outcome(
        dialect=Dialect.LETTA,
        status=Status.FAILED,
        stop_reason="error",
        error=ERROR_PAYLOAD,
        forced_done=None,
        synthesized=(),
        saw_error=True,
        saw_done=True,
        stop_reason_label="error",
    )


@pytest.mark.parametrize(
    ("events", "cause", "status", "stop_reason", "error", "forced", "synth"),
    [
        # stop_reason, no [DONE], clean EOF -> [DONE], missing_done, status from stop_reason.
        pytest.param(
            [MSG, sr("end_turn")],
            EndCause.EOF,
            Status.COMPLETED,
            "end_turn",
            None,
            ForcedDone.MISSING_DONE,
            ["done"],
            id="stop_reason-eof",
        ),
        pytest.param(
            [sr("max_tokens_exceeded")],
            EndCause.EOF,
            Status.FAILED,
            "max_tokens_exceeded",
            None,
            ForcedDone.MISSING_DONE,
            ["done"],
            id="failed-stop_reason-eof",
        ),
        pytest.param(
            [sr("cancelled")],
            EndCause.EOF,
            Status.CANCELLED,
            "cancelled",
            None,
            ForcedDone.MISSING_DONE,
            ["done"],
            id="cancelled-stop_reason-eof",
        ),
        pytest.param(
            [sr("mystery")],
            EndCause.EOF,
            Status.COMPLETED,
            "mystery",
            None,
            ForcedDone.MISSING_DONE,
            ["done"],
            id="unknown-stop_reason-eof",
        ),
        # error event, no [DONE], clean EOF -> [DONE], missing_done_after_error, failed.
        pytest.param(
            [MSG, ERR],
            EndCause.EOF,
            Status.FAILED,
            None,
            ERROR_PAYLOAD,
            ForcedDone.MISSING_DONE_AFTER_ERROR,
            ["done"],
            id="error-eof",
        ),
        pytest.param(
            [sr("error"), ERR],
            EndCause.EOF,
            Status.FAILED,
            "error",
            ERROR_PAYLOAD,
            ForcedDone.MISSING_DONE_AFTER_ERROR,
            ["done"],
            id="stop_reason-error-eof",
        ),
        pytest.param(
            [sr("end_turn"), ERR],
            EndCause.EOF,
            Status.FAILED,
            "end_turn",
            ERROR_PAYLOAD,
            ForcedDone.MISSING_DONE_AFTER_ERROR,
            ["done"],
            id="completed-stop_reason-error-eof",
        ),
        pytest.param(
            [ERR, sr("end_turn")],
            EndCause.EOF,
            Status.FAILED,
            "end_turn",
            ERROR_PAYLOAD,
            ForcedDone.MISSING_DONE_AFTER_ERROR,
            ["done"],
            id="error-then-stop_reason-eof",
        ),
        pytest.param(
            [ERR_TEXT],
            EndCause.EOF,
            Status.FAILED,
            None,
            {"message": "upstream exploded"},
            ForcedDone.MISSING_DONE_AFTER_ERROR,
            ["done"],
            id="text-error-eof",
        ),
        # nothing terminal, clean EOF -> stop_reason error, error event, [DONE].
        pytest.param(
            [],
            EndCause.EOF,
            Status.FAILED,
            "error",
            "synthesized",
            ForcedDone.STREAM_INCOMPLETE,
            ["stop_reason:error", "error:stream_incomplete", "done"],
            id="empty-eof",
        ),
        pytest.param(
            [MSG, REASONING, Event(data=None, event="ping")],
            EndCause.EOF,
            Status.FAILED,
            "error",
            "synthesized",
            ForcedDone.STREAM_INCOMPLETE,
            ["stop_reason:error", "error:stream_incomplete", "done"],
            id="messages-eof",
        ),
        # cancelled through the cancel API.
        pytest.param(
            [MSG],
            EndCause.CANCELLED,
            Status.CANCELLED,
            "cancelled",
            None,
            ForcedDone.CANCELLED,
            ["stop_reason:cancelled", "done"],
            id="cancel",
        ),
        pytest.param(
            [],
            EndCause.CANCELLED,
            Status.CANCELLED,
            "cancelled",
            None,
            ForcedDone.CANCELLED,
            ["stop_reason:cancelled", "done"],
            id="cancel-empty",
        ),
        # A cancel after the upstream's stop reason only cut off [DONE]: status follows the
        # stored stop reason, as a replay would read it.
        pytest.param(
            [sr("end_turn")],
            EndCause.CANCELLED,
            Status.COMPLETED,
            "end_turn",
            None,
            ForcedDone.CANCELLED,
            ["done"],
            id="cancel-after-stop_reason",
        ),
        pytest.param(
            [ERR],
            EndCause.CANCELLED,
            Status.CANCELLED,
            "cancelled",
            ERROR_PAYLOAD,
            ForcedDone.CANCELLED,
            ["stop_reason:cancelled", "done"],
            id="cancel-after-error",
        ),
        pytest.param(
            [sr("error"), ERR],
            EndCause.CANCELLED,
            Status.FAILED,
            "error",
            ERROR_PAYLOAD,
            ForcedDone.CANCELLED,
            ["done"],
            id="cancel-after-stop_reason-and-error",
        ),
    ],
)
def test_terminal_table(
    events: list[Event],
    cause: EndCause,
    status: Status,
    stop_reason: str | None,
    error: Any,
    forced: ForcedDone,
    synth: list[str],
) -> None:
    outcome = run(events, cause)
    assert outcome.status is status
    assert outcome.stop_reason == stop_reason
    assert outcome.forced_done is forced
    assert kinds(outcome.synthesized) == synth
    assert outcome.saw_done is False
    assert outcome.saw_error is any(e.event == "error" for e in events)
    if error == "synthesized":
        assert outcome.error == synthesized_error(outcome)
    else:
        assert outcome.error == error
    assert outcome.synthesized[-1] == Synthesized(data="[DONE]", event=None)


@pytest.mark.parametrize("cause", FAILURE_CAUSES)
@pytest.mark.parametrize(
    ("events", "stop_reason", "error", "synth"),
    [
        pytest.param([], "error", "synthesized", ["stop_reason:error", "error:CAUSE", "done"]),
        pytest.param([MSG], "error", "synthesized", ["stop_reason:error", "error:CAUSE", "done"]),
        pytest.param([sr("end_turn")], "end_turn", "synthesized", ["error:CAUSE", "done"]),
        pytest.param(
            [sr("llm_api_error")], "llm_api_error", "synthesized", ["error:CAUSE", "done"]
        ),
        pytest.param([ERR], "error", ERROR_PAYLOAD, ["stop_reason:error", "done"]),
        pytest.param([sr("end_turn"), ERR], "end_turn", ERROR_PAYLOAD, ["done"]),
        pytest.param([ERR, sr("error")], "error", ERROR_PAYLOAD, ["done"]),
    ],
)
def test_failure_causes(
    cause: EndCause,
    events: list[Event],
    stop_reason: str,
    error: Any,
    synth: list[str],
) -> None:
    outcome = run(events, cause)
    assert outcome.status is Status.FAILED
    assert outcome.forced_done is ForcedDone(cause.value)
    assert outcome.forced_done.value == cause.value
    assert outcome.stop_reason == stop_reason
    assert kinds(outcome.synthesized) == [k.replace("CAUSE", cause.value) for k in synth]
    if error == "synthesized":
        assert outcome.error == synthesized_error(outcome)
        assert outcome.error["error_type"] == cause.value
    else:
        assert outcome.error == error
    assert outcome.synthesized[-1] == Synthesized(data="[DONE]")


@pytest.mark.parametrize("cause", [EndCause.EOF, *FAILURE_CAUSES])
def test_synthesized_error_payload(cause: EndCause) -> None:
    outcome = run([MSG], cause)
    stop, err, done = outcome.synthesized
    assert stop == Synthesized(data='{"message_type":"stop_reason","stop_reason":"error"}')
    assert err.event == "error"
    assert "\n" not in text(err)
    assert "\r" not in text(err)
    payload = json.loads(text(err))
    assert set(payload) == {"message_type", "error_type", "message", "detail"}
    assert payload["message_type"] == "error_message"
    assert payload["error_type"] == cause.value
    assert isinstance(payload["message"], str)
    assert payload["message"]
    assert payload["detail"] is None
    assert outcome.error == payload
    assert done == Synthesized(data="[DONE]", event=None)


def test_synthesized_error_messages_differ_per_cause() -> None:
    messages = {
        synthesized_error(run([], cause))["message"] for cause in [EndCause.EOF, *FAILURE_CAUSES]
    }
    assert len(messages) == 5


@pytest.mark.parametrize("cause", [EndCause.EOF, *FAILURE_CAUSES])
@pytest.mark.parametrize(
    "detail",
    ["ConnectionResetError: [Errno 104]", 'quote " backslash \\ newline \n tab \t é ✓', ""],
)
def test_detail_appears_in_the_synthesized_error(cause: EndCause, detail: str) -> None:
    outcome = run([MSG], cause, detail=detail)
    payload = synthesized_error(outcome)
    assert payload["detail"] == detail
    assert outcome.error == payload
    [err] = [s for s in outcome.synthesized if s.event == "error"]
    assert "\n" not in text(err)
    assert "\r" not in text(err)


def test_detail_is_ignored_when_the_upstream_error_is_kept() -> None:
    outcome = run([ERR], EndCause.UPSTREAM_ERROR, detail="reset")
    assert outcome.error == ERROR_PAYLOAD
    assert kinds(outcome.synthesized) == ["stop_reason:error", "done"]


def test_stop_reason_synthesized_data_is_exact() -> None:
    cancelled = run([], EndCause.CANCELLED)
    assert cancelled.synthesized == (
        Synthesized(data='{"message_type":"stop_reason","stop_reason":"cancelled"}'),
        Synthesized(data="[DONE]"),
    )
    assert parse_payload(cancelled.synthesized[0].data) == {
        "message_type": "stop_reason",
        "stop_reason": "cancelled",
    }


def test_default_status_does_not_apply_without_done() -> None:
    outcome = run([], EndCause.EOF, default_status=Status.COMPLETED)
    assert outcome.status is Status.FAILED
    assert outcome.forced_done is ForcedDone.STREAM_INCOMPLETE


def test_finish_is_idempotent() -> None:
    tracker = Tracker()
    feed(tracker, [MSG])
    first = tracker.finish(EndCause.UPSTREAM_TIMEOUT, detail="read timeout")
    assert tracker.finish() is first
    assert tracker.finish(EndCause.CANCELLED, detail="other") is first
    assert first.forced_done is ForcedDone.UPSTREAM_TIMEOUT


def test_finish_is_idempotent_after_natural_done() -> None:
    tracker = Tracker()
    feed(tracker, [sr("end_turn"), DONE])
    first = tracker.finish()
    assert tracker.finish(EndCause.PRODUCER_LOST) is first
    assert first.forced_done is None


# --- status mapping --------------------------------------------------------------------------


def test_status_table_is_exactly_the_design_list() -> None:
    assert dict(DESIGN_STATUS_TABLE) == STOP_REASON_STATUS


@pytest.mark.parametrize(("reason", "status"), DESIGN_STATUS_TABLE)
@pytest.mark.parametrize("default", [Status.FAILED, Status.COMPLETED])
def test_run_status_from_stop_reason(reason: str, status: Status, default: Status) -> None:
    assert run_status(reason, False, default) is status
    assert stop_reason_label(reason) == reason


@pytest.mark.parametrize(("reason", "status"), DESIGN_STATUS_TABLE)
@pytest.mark.parametrize("default", [Status.FAILED, Status.COMPLETED])
def test_full_run_status_from_stop_reason(reason: str, status: Status, default: Status) -> None:
    outcome = run([MSG, sr(reason), DONE], default_status=default)
    assert outcome.status is status
    assert outcome.stop_reason == reason
    assert outcome.stop_reason_label == reason
    assert outcome.forced_done is None
    assert outcome.synthesized == ()


@pytest.mark.parametrize("reason", COMPLETED_REASONS)
def test_completed_stop_reason_with_error_is_failed(reason: str) -> None:
    assert run_status(reason, True, Status.COMPLETED) is Status.FAILED
    outcome = run([sr(reason), ERR, DONE], default_status=Status.COMPLETED)
    assert outcome.status is Status.FAILED
    assert outcome.stop_reason == reason
    assert outcome.forced_done is None


@pytest.mark.parametrize("reason", FAILED_REASONS)
def test_failed_stop_reason_with_or_without_error(reason: str) -> None:
    assert run_status(reason, False, Status.COMPLETED) is Status.FAILED
    assert run_status(reason, True, Status.COMPLETED) is Status.FAILED


def test_cancelled_stop_reason_with_error_stays_cancelled() -> None:
    assert run_status("cancelled", True, Status.FAILED) is Status.CANCELLED
    assert run([sr("cancelled"), ERR, DONE]).status is Status.CANCELLED


@pytest.mark.parametrize(
    ("reason", "saw_error", "default", "status"),
    [
        (None, True, Status.FAILED, Status.FAILED),
        (None, True, Status.COMPLETED, Status.FAILED),
        (None, False, Status.FAILED, Status.FAILED),
        (None, False, Status.COMPLETED, Status.COMPLETED),
        ("mystery", False, Status.FAILED, Status.COMPLETED),
        ("mystery", True, Status.COMPLETED, Status.FAILED),
        ("other", False, Status.FAILED, Status.COMPLETED),
        ("", False, Status.FAILED, Status.COMPLETED),
    ],
)
def test_run_status_edges(
    reason: str | None, saw_error: bool, default: Status, status: Status
) -> None:
    assert run_status(reason, saw_error, default) is status


def test_done_with_error_and_no_stop_reason_is_failed() -> None:
    outcome = run([ERR, DONE], default_status=Status.COMPLETED)
    assert outcome.status is Status.FAILED
    assert outcome.stop_reason is None
    assert outcome.stop_reason_label == "none"
    assert outcome.error == ERROR_PAYLOAD
    assert outcome.forced_done is None
    assert outcome.synthesized == ()


@pytest.mark.parametrize("default", [Status.FAILED, Status.COMPLETED])
def test_done_alone_uses_default_status(default: Status) -> None:
    outcome = run([MSG, DONE], default_status=default)
    assert outcome.status is default
    assert outcome.stop_reason is None
    assert outcome.stop_reason_label == "none"
    assert outcome.forced_done is None
    assert outcome.synthesized == ()


def test_default_status_is_failed() -> None:
    assert Tracker().default_status is Status.FAILED
    assert run([DONE]).status is Status.FAILED


def test_unknown_stop_reason_is_completed_with_label_other() -> None:
    outcome = run([sr("brand_new_reason"), DONE])
    assert outcome.status is Status.COMPLETED
    assert outcome.stop_reason == "brand_new_reason"
    assert outcome.stop_reason_label == "other"


@pytest.mark.parametrize("reason", [None, 7, ["x"]])
def test_non_string_stop_reason_run_is_completed_other(reason: object) -> None:
    outcome = run([sr(reason), DONE])
    assert outcome.status is Status.COMPLETED
    assert outcome.stop_reason == "other"
    assert outcome.stop_reason_label == "other"


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (None, "none"),
        ("end_turn", "end_turn"),
        ("cancelled", "cancelled"),
        ("context_window_overflow_in_system_prompt", "context_window_overflow_in_system_prompt"),
        ("mystery", "other"),
        ("END_TURN", "other"),
        ("", "other"),
        ("other", "other"),
        ("none", "other"),
    ],
)
def test_stop_reason_label(reason: str | None, label: str) -> None:
    assert stop_reason_label(reason) == label


# --- property: exactly one [DONE], and it is last ---------------------------------------------

KIND_EVENTS: dict[str, Event] = {
    "msg": MSG,
    "reasoning": REASONING,
    "fake_done_text": Event(data='{"message_type":"assistant_message","content":"data: [DONE]"}'),
    "fake_stop_text": Event(data='{"message_type":"assistant_message","content":"stop_reason"}'),
    "stop_end_turn": sr("end_turn"),
    "stop_error": sr("error"),
    "stop_cancelled": sr("cancelled"),
    "stop_max_tokens": sr("max_tokens_exceeded"),
    "stop_unknown": sr("mystery"),
    "stop_nonstr": sr(3),
    "error_json": ERR,
    "error_json2": ERR2,
    "error_text": ERR_TEXT,
    "no_data": Event(data=None, event="ping"),
    "done": DONE,
}


def wire_roundtrip(events: Sequence[Event]) -> list[Event]:
    """Encode events the way the tee stores them and decode them the way a replay client does."""
    decoder = SSEDecoder()
    raw = b"".join(encode_event(e.data, event=e.event) for e in events)
    items = decoder.feed(raw)
    assert all(isinstance(i, Event) for i in items)
    return [i for i in items if isinstance(i, Event)]


def status_may_differ_on_replay(tracker_stop: str | None, outcome: Outcome) -> bool:
    """Where re-tracking the final event sequence legitimately gives another status.

    The sidecar keeps an upstream stop_reason instead of synthesizing one, so a replay sees the
    upstream's reason, while the live outcome follows the forced cause: an error/failure after a
    ``cancelled`` stop reason is failed.
    """
    if outcome.saw_done or outcome.forced_done is ForcedDone.MISSING_DONE or tracker_stop is None:
        return False
    return (outcome.status is Status.CANCELLED) != (
        STOP_REASON_STATUS.get(tracker_stop) is Status.CANCELLED
    )


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(KIND_EVENTS)), max_size=12),
    cause=st.sampled_from(list(EndCause)),
    default=st.sampled_from([Status.FAILED, Status.COMPLETED]),
    detail=st.one_of(st.none(), st.text(max_size=20)),
)
def test_exactly_one_done_and_it_is_last(
    names: list[str], cause: EndCause, default: Status, detail: str | None
) -> None:
    events = [KIND_EVENTS[n] for n in names]
    tracker = Tracker(default_status=default)
    transitions = feed(tracker, events)
    tracker_stop = tracker.stop_reason
    outcome = tracker.finish(cause, detail)
    assert tracker.finish(EndCause.CANCELLED) is outcome

    # What the tee relays and stores: upstream events up to its [DONE] (the tracker ignores the
    # rest), then the synthesized ones.
    upstream_done = "done" in names
    relayed = events[: names.index("done") + 1] if upstream_done else events
    final = relayed + [Event(data=s.data, event=s.event) for s in outcome.synthesized]

    def is_done_marker(e: Event) -> bool:
        return e.data == "[DONE]" and e.event != "error"

    done_positions = [i for i, e in enumerate(final) if is_done_marker(e)]
    assert done_positions == [len(final) - 1]

    if upstream_done:
        assert outcome.synthesized == ()
        assert outcome.forced_done is None
        assert outcome.saw_done is True
    else:
        assert outcome.synthesized[-1] == Synthesized(data="[DONE]", event=None)
        assert sum(s.data == "[DONE]" for s in outcome.synthesized) == 1
        assert outcome.forced_done is not None
        assert outcome.saw_done is False
    assert outcome.status is not Status.RUNNING

    # Transitions: exactly one saw_done; saw_done_after_error iff an error preceded it.
    flat = [t for ts in transitions for t in ts]
    assert flat.count(Transition.SAW_DONE) == (1 if upstream_done else 0)
    error_before_done = any(e.event == "error" for e in relayed)
    assert flat.count(Transition.SAW_DONE_AFTER_ERROR) == (
        1 if upstream_done and error_before_done else 0
    )
    assert flat.count(Transition.SAW_ERROR) == sum(e.event == "error" for e in relayed)
    assert outcome.saw_error is error_before_done

    # A failure is never reported as success.
    if outcome.saw_error or outcome.forced_done not in (
        None,
        ForcedDone.MISSING_DONE,
        ForcedDone.CANCELLED,
    ):
        assert outcome.status is not Status.COMPLETED

    # Replay: re-tracking what was stored (through the wire format) is a natural end that agrees.
    replay = Tracker(default_status=default)
    feed(replay, wire_roundtrip(final))
    again = replay.finish(EndCause.PRODUCER_LOST)
    assert again.saw_done is True
    assert again.forced_done is None
    assert again.synthesized == ()
    assert again.stop_reason == outcome.stop_reason
    assert again.error == outcome.error
    if not status_may_differ_on_replay(tracker_stop, outcome):
        assert again.status is outcome.status


@pytest.mark.parametrize("cause", FAILURE_CAUSES)
def test_detail_after_an_upstream_stop_reason(cause: EndCause) -> None:
    outcome = run([sr("end_turn")], cause, detail="boom")
    assert kinds(outcome.synthesized) == [f"error:{cause.value}", "done"]
    assert synthesized_error(outcome)["detail"] == "boom"
