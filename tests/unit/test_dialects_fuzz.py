"""Every dialect's tracker over arbitrary event sequences and end causes (hypothesis).

The tee relays upstream events until the tracker says the protocol's own terminal came, then the
tracker's synthesized events; what a client gets is that stream. For every dialect, whatever
came and however it ended:

- ``finish`` gives one outcome (idempotent) with a final status (never ``running``);
- the client's stream has exactly one terminal, and it is last: a fresh tracker of the same
  dialect fed that stream sees its terminal exactly at its last event (generic: the stored end
  without bytes, or its own ``[DONE]``);
- events are synthesized only when the upstream's own terminal never came, and a natural end is
  never forced (nor a forced one natural);
- the tracker restored from the meta it wrote (the orphan finalizer's view) ends the run exactly
  as the live one does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dialects import new_tracker, restore_tracker
from sidecar.payload import parse_payload
from sidecar.sse import Event
from sidecar.terminal import SILENT_END, Dialect, EndCause, Status

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def jev(payload: Any, event: str | None = None) -> Event:
    return Event(json.dumps(payload), event=event)


text = st.text(max_size=8)
junk = st.sampled_from(
    [Event("plain"), Event(""), Event("[DONE] not quite"), Event("{bad json"), jev([1, 2])]
) | text.map(Event)

LETTA = st.one_of(
    junk,
    st.just(Event("[DONE]")),
    st.sampled_from(["end_turn", "error", "cancelled", "max_steps", "weird", None]).map(
        lambda r: jev({"message_type": "stop_reason", "stop_reason": r})
    ),
    st.sampled_from(["assistant_message", "ping", "usage_statistics"]).map(
        lambda kind: jev({"message_type": kind, "run_id": "r-up", "seq_id": 3})
    ),
    st.sampled_from([Event("boom", event="error"), jev({"error_type": "x"}, "error")]),
)
CHAT = st.one_of(
    junk,
    st.just(Event("[DONE]")),
    st.sampled_from([None, "stop", "length", "tool_calls", "weird"]).map(
        lambda r: jev({"id": "chatcmpl-z", "choices": [{"delta": {}, "finish_reason": r}]})
    ),
    st.sampled_from([{"error": {"message": "x"}}, {"error": None}, {"error": "text"}]).map(jev),
)
_RESP = {"id": "resp_z", "model": "m", "created_at": 1}
RESPONSES = st.one_of(
    junk,
    st.just(Event("[DONE]")),
    st.integers(-3, 50).flatmap(
        lambda n: st.sampled_from(
            [
                jev({"type": "response.created", "sequence_number": n, "response": _RESP}),
                jev({"type": "response.output_text.delta", "sequence_number": n, "delta": "a"}),
                jev({"type": "response.completed", "sequence_number": n, "response": _RESP}),
                jev({"type": "response.incomplete", "sequence_number": n, "response": _RESP}),
                jev({"type": "response.failed", "sequence_number": n, "response": _RESP}),
                jev({"type": "error", "sequence_number": n, "code": "c", "message": "m"}),
            ]
        )
    ),
)
ANTHROPIC = st.one_of(
    junk,
    st.sampled_from(
        [
            jev({"type": "message_start", "message": {"id": "msg_z"}}, "message_start"),
            jev({"type": "content_block_delta", "delta": {"text": "a"}}, "content_block_delta"),
            jev({"type": "ping"}, "ping"),
            jev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, "message_delta"),
            jev({"type": "message_delta", "delta": {"stop_reason": None}}, "message_delta"),
            jev({"type": "message_stop"}, "message_stop"),
            jev({"type": "error", "error": {"type": "overloaded_error"}}, "error"),
            Event("raw failure", event="error"),
        ]
    ),
)
GENERIC = st.one_of(junk, st.just(Event("[DONE]")), st.just(Event("x", event="error")))
ALPHABETS = {
    Dialect.LETTA: LETTA,
    Dialect.OPENAI_CHAT: CHAT,
    Dialect.OPENAI_RESPONSES: RESPONSES,
    Dialect.ANTHROPIC: ANTHROPIC,
    Dialect.GENERIC: GENERIC,
}


def ends_at_its_last_event(dialect: Dialect, stream: list[Event]) -> bool:
    """A client of ``dialect`` reading ``stream`` meets its terminal exactly at the last event."""
    reader = new_tracker(dialect)
    for i, event in enumerate(stream):
        reader.observe(event, parse_payload(event.data))
        if reader.saw_done:
            return i == len(stream) - 1
    return False


@FUZZ
@pytest.mark.parametrize("dialect", list(Dialect))
@given(data=st.data())
def test_one_terminal_last_whatever_comes(dialect: Dialect, data: st.DataObject) -> None:
    events = data.draw(st.lists(ALPHABETS[dialect], max_size=12), label="events")
    cause = data.draw(st.sampled_from(list(EndCause)), label="cause")
    partial = data.draw(st.booleans(), label="closed inside an event")
    default = data.draw(st.sampled_from([Status.FAILED, Status.COMPLETED]), label="default")

    tracker = new_tracker(dialect, default)
    relayed: list[Event] = []
    meta: dict[str, str] = {}
    for event in events:
        if tracker.saw_done:
            break  # the tee stops relaying at the terminal
        tracker.observe(event, parse_payload(event.data))
        relayed.append(event)
        meta |= tracker.take_meta() or {}
    natural = tracker.saw_done
    if cause is EndCause.EOF:
        tracker.partial_event = partial
    outcome = tracker.finish(cause, "detail")
    assert tracker.finish(EndCause.UPSTREAM_ERROR) is outcome
    assert outcome.status in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)
    assert outcome.dialect is dialect

    sent = [Event(s.data, event=s.event) for s in outcome.synthesized if s.data is not None]
    if natural:
        assert outcome.forced_done is None
        assert outcome.synthesized == ()
        assert ends_at_its_last_event(dialect, relayed)
    else:
        generic_eof = dialect is Dialect.GENERIC and cause is EndCause.EOF and not partial
        assert (outcome.forced_done is None) == generic_eof
        assert outcome.synthesized, "an end the upstream did not give needs a stored end"
        if dialect is Dialect.GENERIC:
            # Nothing in the stream: its end is stored without bytes.
            assert outcome.synthesized == (SILENT_END,)
            assert outcome.silent_end
        else:
            assert sent
            assert all(s.data is not None for s in outcome.synthesized)
            assert ends_at_its_last_event(dialect, relayed + sent)
        if generic_eof:
            assert outcome.status is Status.COMPLETED
        elif cause is not EndCause.CANCELLED and outcome.stop_reason is None:
            assert outcome.status is Status.FAILED

    # The orphan finalizer's tracker, from the meta alone, ends it the same way.
    if not natural:
        restored = restore_tracker(
            dialect.value,
            stop_reason=meta.get("stop_reason"),
            error=json.loads(meta["error"]) if "error" in meta else None,
            last_seq=len(relayed),
            protocol_id=meta.get("protocol_id"),
            dialect_state=meta.get("dialect_state"),
            default_status=default,
        )
        restored.partial_event = tracker.partial_event
        assert restored.finish(cause, "detail") == outcome
