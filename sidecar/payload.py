"""JSON payloads of SSE events: parsing, and the ``letta`` dialect's ids (``seq_id`` set to the
event's seq, a missing ``run_id`` filled). Pure."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from sidecar.sse import encode_event

# orjson reads integers beyond 64 bits as floats; a payload with such a number is rewritten with
# the stdlib instead, so filling ids never changes a value it did not fill.
_BIG_INT = re.compile(r"\d{19,}")


def parse_payload(data: str | None) -> Any | None:
    """The event's data as JSON, or None when it is not a JSON object or array."""
    if not data:
        return None
    first = data.lstrip()[:1]
    if first not in ("{", "["):
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _has_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            return True
        if kind is dict:
            item = item.values()
        elif kind is not list:
            continue
        # The types of a container's members in one pass in C; only nested containers are
        # walked (a token event's payload is flat: this was 6 % of the tee's samples).
        kinds = set(map(type, item))
        if float in kinds:
            return True
        if dict in kinds or list in kinds:
            stack.extend(v for v in item if type(v) is dict or type(v) is list)
    return False


def fill_ids(data: str, payload: Any, seq: int, run_id: str) -> str:
    """Set the top-level ``seq_id`` to the event's seq, and fill a null or missing ``run_id``
    (letta dialect).

    ``seq_id`` is the cursor a Letta client resumes from (``runs.messages.stream(run_id,
    starting_after=<seq_id>)``), and the sidecar serves that resume by its own seq: so the two
    must be one number. An upstream that numbers its events itself (from 0, or without counting
    its pings) would otherwise hand the client a cursor that replays events it already has.

    Real JSON rewriting: the payload is re-serialised only when something changed, so events
    that already carry the right ids keep their exact bytes.
    """
    filled = _filled(data, payload, seq, run_id)
    return data if filled is None else filled.decode()


def _filled(data: str, payload: Any, seq: int, run_id: str) -> bytes | None:
    """``fill_ids``' rewritten payload as bytes (one line of JSON), or None when nothing
    changes."""
    if not isinstance(payload, dict):
        return None
    fills: dict[str, Any] = {}
    current = payload.get("seq_id")
    if current != seq or type(current) is not int:
        fills["seq_id"] = seq
    if payload.get("run_id") is None:
        fills["run_id"] = run_id
    if not fills:
        return None
    payload.update(fills)
    # Only a payload orjson read a float in can hold such an integer: the search is skipped
    # for the others (most token events; it was a tenth of the tee's CPU at 1,000 streams).
    if _has_float(payload) and _BIG_INT.search(data):
        exact = json.loads(data)
        exact.update(fills)
        return json.dumps(exact, ensure_ascii=False, separators=(",", ":")).encode()
    return orjson.dumps(payload)


def render_event(
    data: str,
    *,
    event: str | None,
    retry: int | None,
    seq: int,
    run_id: str,
    fill: bool,
    payload: Any = None,
) -> bytes:
    """The exact bytes of one stored (and relayed) event: ids filled, ``id: <seq>`` line added."""
    if fill:
        if payload is None:
            payload = parse_payload(data)
        if payload is not None and (filled := _filled(data, payload, seq, run_id)) is not None:
            if event is None and retry is None:
                # Serialised JSON is one line: the event's bytes without a detour through str.
                return b"id: %d\ndata: %b\n\n" % (seq, filled)
            data = filled.decode()
    return encode_event(data, event=event, id=seq, retry=retry)
