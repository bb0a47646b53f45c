"""Per-event CPU cost of the tee's pure path, per dialect: decode → parse → track → render.

``python bench/dialects.py`` (or ``python -m bench.dialects``) replays a recorded stream of each
protocol the demo upstream speaks (``sidecar/demo/protocols.py``, one SSE event per chunk, as an
upstream writes them) through what the tee does per event, without I/O, and prints CPU ns per event:

- ``floor``: SSEDecoder.feed + parse_payload + render_event, no tracker at all;
- ``fixed``: the same plus the dialect's tracker, the dialect set in the settings;
- ``auto``: the same with ``auto``: detection on the first event, then the tracker.

``--before`` instead times the tee's per-event loop as it was before the dialects (the letta
``Tracker``, ``is_done`` after every event, the meta built from the transitions) over the letta
stream; it uses only names that exist on both sides, so ``--sidecar-from <checkout>`` times it
against an older checkout of ``sidecar`` (e.g. a ``git worktree`` of the parent commit) for a
before/after comparison on one machine. Each figure is the minimum over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

EVENTS = 2000


def recorded(protocol: str, tokens: int) -> list[bytes]:
    """A demo stream of ``protocol``, one chunk per SSE item, ending normally."""
    from sidecar.demo import protocols

    chosen = {
        "letta": protocols.LETTA,
        "openai-chat": protocols.OPENAI_CHAT,
        "openai-responses": protocols.OPENAI_RESPONSES,
        "anthropic": protocols.ANTHROPIC,
        "generic": protocols.GENERIC,
    }[protocol]
    req = protocols.StreamRequest("normal", tokens, 0, None, ident="bench", fixed=True)
    return list(chosen.chunks(req))


def loop_now(chunks: list[bytes], setting: str | None, floor_fill: bool = False) -> int:
    """The tee's per-event work today (``sidecar/tee.py`` ``_relay``, minus the writer and the
    client); ``setting`` None: no tracker (the floor, rendering with ``floor_fill``). Returns the
    events handled."""
    from sidecar.dialects import detect, new_tracker
    from sidecar.payload import parse_payload, render_event
    from sidecar.sse import Event, SSEDecoder
    from sidecar.terminal import Dialect, DialectTracker

    decoder = SSEDecoder()
    tracker: DialectTracker | None = None
    if setting not in (None, "auto"):
        tracker = new_tracker(Dialect(setting))
    fill = tracker.fills_ids if tracker is not None else floor_fill
    seq = 0
    for chunk in chunks:
        for item in decoder.feed(chunk):
            if not isinstance(item, Event) or item.data is None:
                continue
            payload = parse_payload(item.data)
            meta: dict[str, str] | None = None
            if setting is not None:
                if tracker is None:
                    tracker = new_tracker(detect(item, payload, None))
                    fill = tracker.fills_ids
                    meta = {"dialect": tracker.dialect.value}
                tracker.observe(item, payload)
                if tracker.meta:
                    meta = tracker.take_meta()
            seq += 1
            render_event(
                item.data,
                event=item.event,
                retry=item.retry,
                seq=seq,
                run_id="run-bench",
                fill=fill,
                payload=payload,
            )
            if tracker is not None and tracker.saw_done:
                tracker.finish()
                return seq
            del meta
    return seq


def loop_before(chunks: list[bytes]) -> int:
    """The tee's per-event work before the dialects (letta only): the same names on both sides."""
    import orjson

    from sidecar.payload import parse_payload, render_event
    from sidecar.sse import Event, SSEDecoder
    from sidecar.terminal import Status, Tracker, is_done

    decoder = SSEDecoder()
    tracker = Tracker(default_status=Status.FAILED)
    seq = 0
    for chunk in chunks:
        for item in decoder.feed(chunk):
            if not isinstance(item, Event) or item.data is None:
                continue
            payload = parse_payload(item.data)
            meta: dict[str, str] | None = None
            for transition in tracker.observe(item, payload):
                meta = meta or {}
                if transition == "saw_stop_reason" and tracker.stop_reason is not None:
                    meta["stop_reason"] = tracker.stop_reason
                elif transition == "saw_error":
                    meta["error"] = orjson.dumps(tracker.error).decode()
            seq += 1
            render_event(
                item.data,
                event=item.event,
                retry=item.retry,
                seq=seq,
                run_id="run-bench",
                fill=True,
                payload=payload,
            )
            if is_done(item):
                tracker.finish()
                return seq
    return seq


def ns_per_event(runs: list[Callable[[], int]], repeat: int) -> list[float]:
    """The best ns/event of each of ``runs``, timed in turn (interleaved, so that a busy spell
    of the machine costs every variant alike) in CPU time of this process: on a shared machine
    the wall clock also counts the time spent waiting for a core."""
    best = [float("inf")] * len(runs)
    for _ in range(repeat):
        for i, run in enumerate(runs):
            gc.collect()
            started = time.process_time_ns()
            events = run()
            elapsed = time.process_time_ns() - started
            best[i] = min(best[i], elapsed / events)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="runs per figure (the min counts)")
    parser.add_argument("--tokens", type=int, default=EVENTS, help="token events per stream")
    parser.add_argument("--before", action="store_true", help="time the pre-dialect letta loop")
    parser.add_argument("--sidecar-from", help="import sidecar from this checkout instead")
    args = parser.parse_args(argv)
    if args.sidecar_from:
        sys.path.insert(0, args.sidecar_from)
    if args.before:
        # The pre-dialect demo upstream has no protocols module: build the letta stream here.
        chunks = _letta_stream(args.tokens)
        [figure] = ns_per_event([lambda: loop_before(chunks)], args.repeat)
        print(f"before (letta, pre-dialect tee loop): {figure:8.0f} ns/event")
        return 0
    rows: list[tuple[str, float, float, float]] = []
    for protocol in ("letta", "openai-chat", "openai-responses", "anthropic", "generic"):
        chunks = recorded(protocol, args.tokens)
        fill = protocol == "letta"
        floor, fixed, auto = ns_per_event(
            [
                partial(loop_now, chunks, None, fill),
                partial(loop_now, chunks, protocol),
                partial(loop_now, chunks, "auto"),
            ],
            args.repeat,
        )
        rows.append((protocol, floor, fixed, auto))
    chunks = _letta_stream(args.tokens)
    print(f"{args.tokens} token events per stream, min of {args.repeat} runs, ns per event")
    print(f"{'dialect':<18}{'floor':>8}{'fixed':>8}{'auto':>8}{'tracker':>9}{'auto-fixed':>11}")
    for protocol, floor, fixed, auto in rows:
        print(
            f"{protocol:<18}{floor:8.0f}{fixed:8.0f}{auto:8.0f}"
            f"{fixed - floor:9.0f}{auto - fixed:11.0f}"
        )
    before, now = ns_per_event(
        [lambda: loop_before(chunks), lambda: loop_now(chunks, "letta")], args.repeat
    )
    print(f"letta, the pre-dialect loop on this code: {before:.0f} ns/event; today's: {now:.0f}")
    return 0


def _letta_stream(tokens: int) -> list[bytes]:
    """A Letta stream as the demo upstream sends it (the same bytes on both sides)."""
    import json

    def data(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    out = [b": ping\n\n"]
    for i in range(tokens):
        out.append(
            data(
                {
                    "id": "message-bench-a",
                    "date": "2023-11-14T22:13:20+00:00",
                    "message_type": "assistant_message",
                    "content": f"word{i} ",
                    "seq_id": None,
                    "run_id": None,
                }
            )
        )
    out.append(data({"message_type": "stop_reason", "stop_reason": "end_turn"}))
    out.append(data({"message_type": "usage_statistics", "completion_tokens": tokens}))
    out.append(b"data: [DONE]\n\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
