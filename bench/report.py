"""Tables (Markdown, printed and saved) and the README section, from a run's results."""

from __future__ import annotations

import math
from typing import Any

from bench.machine import one_line

DASH = "\u2013"  # en dash


def _num(v: float, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "∞"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def span(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 0) -> str:
    """``median (min-max)`` of a spread, scaled (an en dash between min and max)."""
    if not s or s.get("median") is None or math.isnan(s["median"]):
        return "n/a"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if len(s.get("runs", [])) <= 1 or lo == hi:
        return _num(med, digits)
    return f"{_num(med, digits)} ({_num(lo, digits)}{DASH}{_num(hi, digits)})"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.{digits}f}x"


def med(s: dict[str, Any] | None) -> float:
    if not s or s.get("median") is None:  # (NaN is written to JSON as null)
        return math.nan
    return float(s["median"])


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- the tables --------------------------------------------------------------------------------

NAMES = {
    "direct": "direct to upstream",
    "plain": "plain aiohttp proxy",
    "sidecar": "sse-sidecar",
    "baseline": "sse-sidecar, baseline (--baseline)",
}


def tee_table(tee: dict[str, Any], rate: float) -> str:
    rows = []
    for level, row in tee["summary"].items():
        for target in (t for t in NAMES if t in row):
            r = row[target]
            added50 = span(r.get("added_p50_us"), 1e-3, 2) if target != "direct" else DASH
            added99 = span(r.get("added_p99_us"), 1e-3, 2) if target != "direct" else DASH
            rows.append(
                [
                    level,
                    NAMES[target],
                    span(r["p50_us"], 1e-3, 2),
                    span(r["p99_us"], 1e-3, 2),
                    added50,
                    added99,
                    _num(r["samples"]),
                    str(r["incomplete"]),
                ]
            )
    head = ["streams", "path", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"]
    head += ["events measured", "incomplete streams"]
    return (
        f"Per-event latency, upstream send → client receive, {rate:g} events/s per stream "
        "(~165-byte `data:` JSON events):\n\n" + table(head, rows)
    )


def readers_table(readers: dict[str, Any], rate: float) -> str:
    rows = []
    for level, row in readers["summary"].items():
        for target in ("sidecar", "baseline"):
            if target not in row:
                continue
            d, p, s = row["direct"], row["plain"], row[target]
            w = s["write"]
            rows.append(
                [
                    level if target == "sidecar" else f"{level} (baseline)",
                    span(d["p99_us"], 1e-3, 2),
                    span(p["added_p99_us"], 1e-3, 2),
                    span(s["added_p99_us"], 1e-3, 2),
                    span(s["first_byte_p99_us"], 1e-3, 1),
                    span(s["replay_p50_us"], 1e-3, 2),
                    span(s["replay_p99_us"], 1e-3, 2),
                    span(p["cpu_us_per_event"], 1, 1),
                    span(w["cpu_us_per_event"], 1, 1),
                    f"{w['stored']:,}/{w['expected']:,}",
                    f"{w['dropped']:.0f}",
                    f"{s['readers_complete']:,}/{s['readers']:,}",
                ]
            )
    head = ["streams", "direct p99 ms", "plain added p99 ms", "sidecar added p99 ms"]
    head += ["sidecar first byte p99 ms", "replay lag p50 ms", "replay lag p99 ms"]
    head += ["plain CPU µs/event", "sidecar CPU µs/event", "stored/expected", "dropped"]
    head += ["readers complete"]
    return (
        f"{rate:g} events/s per stream, and a replay reader following each sidecar run live "
        "(it connects at the run's first event); the plain proxy and the direct path carry the "
        "same streams without readers. CPU per event is per live event relayed (the sidecar's "
        "includes parsing, storing and the replay deliveries):\n\n" + table(head, rows)
    )


def runs_table(runs: dict[str, Any], rate: float) -> str:
    summary = runs["summary"]
    first = next(iter(summary.values()), None)
    if first is None:
        return "(no cells)"
    plain = med(summary.get("plain", {}).get("cpu_ms_per_run"))
    names = {**NAMES, "sidecar+reader": "sse-sidecar, a replay reader on every run"}
    rows = []
    for case, r in summary.items():
        rows.append(
            [
                names.get(case, case),
                span(r["cpu_ms_per_run"], 1, 2),
                ratio(med(r["cpu_ms_per_run"]), plain),
                span(r["first_byte_p50_us"], 1e-3, 1),
                span(r["first_byte_p99_us"], 1e-3, 1),
                f"{r['complete']:,}/{r['expected']:,}",
            ]
        )
    head = ["path", "CPU ms per run", "vs plain proxy", "first byte p50 ms", "first byte p99 ms"]
    head += ["runs complete"]
    return (
        f"Short runs opened one after another, {first['per_s']:g} per second, {first['runs']:,} "
        f"per repeat, each {first['events']} events at {rate:g} events/s: the CPU one run costs "
        "the path's process, its events included, and the first byte (connect and request -> "
        "response head) while runs keep opening:\n\n" + table(head, rows)
    )


def scaling_table(scaling: dict[str, Any], rate: float) -> str:
    rows = []
    for r in scaling["summary"].values():
        rows.append(
            [
                str(r["workers"]),
                f"{r['streams']:,}",
                span(r["plain_added_p99_us"], 1e-3, 2),
                span(r["added_p99_us"], 1e-3, 2),
                span(r["replay_p99_us"], 1e-3, 2),
                span(r["first_byte_p99_us"], 1e-3, 1),
                span(r["cpu_us_per_event"], 1, 1),
                f"{r['dropped']:.0f}",
                span(r["sat_events_per_s"]),
                span(r["sat_cores"], 1, 2),
            ]
        )
    head = ["workers", "streams (a reader each)", "plain added p99 ms", "sidecar added p99 ms"]
    head += ["replay lag p99 ms", "first byte p99 ms", "CPU µs/event (all workers)", "dropped"]
    head += ["saturation events/s", "saturation cores"]
    return (
        f"`sse-sidecar serve --workers N`, N x the streams at {rate:g} events/s with a replay "
        "reader each, beside the plain proxy carrying the same streams; then a saturation "
        "cell:\n\n" + table(head, rows)
    )


def saturation_table(res: dict[str, Any]) -> str:
    sat = res["saturation"]["summary"]
    base = med(sat["sidecar:null"]["events_per_s"])
    base_cpu = med(sat["sidecar:null"]["events_per_cpu_s"])
    rows = []
    labels = {
        "direct:null": "direct to upstream (no proxy)",
        "plain:null": "plain aiohttp proxy (no tee)",
        "sidecar:null": "**sse-sidecar** (tee: parse, fill ids, relay, store)",
        "sidecar:filled": "sse-sidecar, ids already filled upstream",
        "baseline:null": "sse-sidecar, baseline (--baseline)",
    }
    for key, label in labels.items():
        if key not in sat:
            continue
        s = sat[key]
        rows.append(
            [
                label,
                span(s["events_per_s"]),
                span(s["target_cores"], 1, 2) if not key.startswith("direct") else DASH,
                span(s["events_per_cpu_s"]) if not key.startswith("direct") else DASH,
                ratio(med(s["events_per_s"]), base),
                ratio(med(s["events_per_cpu_s"]), base_cpu)
                if not key.startswith("direct")
                else DASH,
            ]
        )
    w = res.get("writers", {})
    if "sidecar_summary" in w:
        s = w["sidecar_summary"]
        rows.append(
            [
                "sse-sidecar's writer alone, in-process (no HTTP)",
                span(s["events_per_s"]),
                DASH,
                span(s["events_per_cpu_s"]),
                ratio(med(s["events_per_s"]), base),
                ratio(med(s["events_per_cpu_s"]), base_cpu),
            ]
        )
    if "letta_summary" in w:
        s = w["letta_summary"]
        rows.append(
            [
                "Letta's writer alone, in-process (no HTTP)",
                span(s["events_per_s"]),
                DASH,
                span(s["events_per_cpu_s"]),
                ratio(med(s["events_per_s"]), base),
                ratio(med(s["events_per_cpu_s"]), base_cpu),
            ]
        )
    rb = res.get("redis_benchmark")
    if rb:
        for c in ("c1", "c50"):
            rows.append(
                [
                    f"redis-benchmark XADD -P 50, {c[1:]} connection{'s' if c != 'c1' else ''}",
                    span(rb[c]),
                    DASH,
                    DASH,
                    ratio(med(rb[c]), base),
                    DASH,
                ]
            )
    head = ["path", "events/s", "its CPU (cores)", "events per CPU-second"]
    head += ["events/s vs sse-sidecar", "per CPU-s vs sse-sidecar"]
    return table(head, rows)


def sustained_table(res: dict[str, Any]) -> str:
    """The long saturating cell: what is relayed against what is stored."""
    cells = res["saturation"].get("sustained", {})
    labels = {"sidecar": "sse-sidecar", "baseline": "sse-sidecar, baseline (--baseline)"}
    rows = []
    for key, cell in cells.items():
        rows.append(
            [
                labels.get(key, key),
                f"{cell['expected_events']:,}",
                f"{cell['wall_s']:.1f}",
                _num(cell["events_per_s"]),
                f"{cell['stored']:,}/{cell['expected_events']:,}",
                _num(cell["write"]["dropped"]),
                f"{cell['settle_s']:.1f}",
                _num(cell["stored_per_s"]),
                f"{cell['paced_s']:.1f}",
            ]
        )
    head = [
        "path",
        "events",
        "relayed in s",
        "relayed events/s",
        "stored/expected",
        "dropped",
        "writer done after s",
        "stored events/s",
        "reads held s",
    ]
    n = res["config"]["sat_streams"]
    return (
        f"{n} streams sent as fast as they go, long enough for the writer's backlog to pass "
        "writer_max_bytes if relaying outran storing; one cell. Stored events/s is what reached "
        "Redis over the time until the writer was done (relaying plus the writer's drain after "
        "it); reads held is the time the tees paused for the writer (pacing):\n\n"
        + table(head, rows)
    )


def write_table(res: dict[str, Any]) -> str:
    rows = []
    tee = res.get("tee", {}).get("summary", {})
    for level, row in tee.items():
        w = row["sidecar"]["write"]
        rows.append(
            [
                f"{level} stream{'s' if level != '1' else ''} at the token rate",
                span(w["events_per_s"]),
                span(w["round_trips_per_event"], 1, 3),
                span(w["batch_mean"], 1, 1),
                span(w["batch_p99_le"]),
                span(w["cpu_us_per_event"], 1, 1),
                f"{w['stored']:,}/{w['expected']:,}",
                f"{w['dropped']:.0f}",
            ]
        )
    sat = res.get("saturation", {}).get("summary", {}).get("sidecar:null")
    if sat:
        cells = res["saturation"]["cells"]["sidecar:null"]
        cpu_us = [1e6 * c["cpu_s"]["sidecar"] / max(c["events"], 1) for c in cells]
        from bench.common import spread

        rows.append(
            [
                "saturation",
                span(sat["events_per_s"]),
                span(sat["round_trips_per_event"], 1, 3),
                span(sat["batch_mean"], 1, 1),
                span(spread([c["write"]["batch"]["p99_le"] for c in cells])),
                span(spread(cpu_us), 1, 1),
                f"{sat['stored']:,}/{sat['expected']:,}",
                f"{sum(c['write']['dropped'] for c in cells):.0f}",
            ]
        )
    w = res.get("writers", {})
    for key, label in (("sidecar_summary", "sse-sidecar's"), ("letta_summary", "Letta's")):
        if key not in w:
            continue
        s = w[key]
        runs = res["config"]["writer_runs"]
        rows.append(
            [
                f"{label} writer alone, {runs} runs as fast as it takes them",
                span(s["events_per_s"]),
                span(s["round_trips_per_event"], 1, 3),
                DASH,
                DASH,
                span(_inv(s["events_per_cpu_s"]), 1e6, 1),
                f"{s['stored']:,}/{s['expected']:,}",
                f"{s.get('errors', 0)} errors" if key == "letta_summary" else DASH,
            ]
        )
    if "letta_paced" in w:
        p = w["letta_paced"]
        rows.append(
            [
                f"Letta's writer, {p['runs']:,} runs at the token rate",
                _num(p["chunks"] / p["wall_s"]),
                DASH,
                DASH,
                DASH,
                DASH,
                f"{p['stored']:,}/{p['expected']:,} ({p['runs_short']:,} runs short)",
                str(sum(p["errors"].values())) + " errors",
            ]
        )
    head = ["load", "events/s stored", "Redis round trips/event", "mean batch", "p99 batch ≤"]
    head += ["CPU µs/event", "stored/expected", "dropped"]
    return table(head, rows)


def _inv(s: dict[str, Any]) -> dict[str, Any]:
    def inv(x: float) -> float:
        return 1 / x if x else math.nan

    return {
        "median": inv(s["median"]),
        "min": inv(s["max"]),
        "max": inv(s["min"]),
        "runs": s["runs"],
    }


def replay_tables(res: dict[str, Any]) -> str:
    rep = res["replay"]
    rows = []
    for k, peers in rep["lag_summary"].items():
        s = peers["sidecar"]
        letta = peers.get("letta")
        rows.append(
            [
                k,
                span(s["p50_us"], 1e-3, 2),
                span(s["p99_us"], 1e-3, 2),
                span(letta["p50_us"], 1e-3, 1) if letta else "n/a",
                span(letta["p99_us"], 1e-3, 1) if letta else "n/a",
                ratio(med(letta["p99_us"]), med(s["p99_us"]), 1) if letta else "n/a",
                span(s["complete_readers"])
                + " / "
                + (span(letta["complete_readers"]) if letta else "n/a"),
            ]
        )
    head = ["readers", "sse-sidecar p50 ms", "p99 ms", "Letta p50 ms", "Letta p99 ms"]
    head += ["Letta p99 / sse-sidecar p99", "readers complete (sidecar / Letta)"]
    lag = (
        "Live-tail lag, upstream send → replay reader receive (one run at the token rate, "
        "readers following it):\n\n" + table(head, rows)
    )
    cu = rep["catchup"]
    base = med(cu["sidecar_default_batch"]["events_per_s"])
    rows = [
        [
            "sse-sidecar, GET .../stream (default batch_size 100)",
            span(cu["sidecar_default_batch"]["events_per_s"]),
            "1.00x",
        ],
        [
            "sse-sidecar, ?batch_size=1000",
            span(cu["sidecar_batch_1000"]["events_per_s"]),
            ratio(med(cu["sidecar_batch_1000"]["events_per_s"]), base),
        ],
    ]
    if "letta" in cu:
        rows.append(
            [
                "Letta redis_sse_stream_generator (in-process, no HTTP)",
                span(cu["letta"]["events_per_s"]),
                ratio(med(cu["letta"]["events_per_s"]), base),
            ]
        )
    catch = f"Catch-up of a finished {cu['events']:,}-event run, one reader:\n\n" + table(
        ["reader", "events/s", "vs sse-sidecar"], rows
    )
    return "\n\n".join([lag, catch])


def idle_table(idle: dict[str, Any]) -> str:
    rows = []
    for label, r in idle.items():
        peer = label.split(":", 1)[0]
        rows.append(
            [
                "sse-sidecar" if peer == "sidecar" else "Letta",
                f"{r['readers']:,} on {r['runs']:,} run{'s' if r['runs'] > 1 else ''}",
                f"{r['window_s']:.0f}",
                str(r["redis_connections"]),
                str(r.get("redis_connections_idle", "-")),
                _num(r["commands_per_s"], 1),
                _num(r["rss_delta_mib"], 1),
                _num(r["cpu_cores"], 3),
                f"{r['closed']['alive_at_close']:,}",
            ]
        )
    head = ["reader", "readers", "window s", "Redis connections after opening"]
    head += ["at the window's end", "Redis commands/s"]
    head += ["RSS + MiB", "CPU cores", "readers still streaming"]
    return (
        "Idle readers: running runs, nothing written while the window lasts (the sidecar's "
        "heartbeat is 15 s):\n\n" + table(head, rows)
    )


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the issue."""
    out: list[tuple[str, str, bool | None]] = []
    tee = res.get("tee", {}).get("summary", {})
    if "100" in tee:
        a = med(tee["100"]["sidecar"]["added_p99_us"]) / 1000
        out.append(("added latency p99 < 2 ms at 100 streams", f"{a:.2f} ms", a < 2))
    sat = res.get("saturation", {}).get("summary", {}).get("sidecar:null")
    w = res.get("writers", {})
    if sat:
        eps, epc = med(sat["events_per_s"]), med(sat["events_per_cpu_s"])
        out.append(
            (
                "saturation ≥ 50,000 events/s teed per process",
                f"{eps:,.0f} events/s ({epc:,.0f} per sidecar CPU-second)",
                eps >= 50_000,
            )
        )
        if "letta_summary" in w and "sidecar_summary" in w:
            # Writer against writer (issue 15), both in-process; the whole tee's saturation
            # against Letta's writer alone is shown beside it.
            lw = med(w["letta_summary"]["events_per_s"])
            sw = med(w["sidecar_summary"]["events_per_s"])
            out.append(
                (
                    "writer alone ≥ 3x Letta's writer alone",
                    f"{sw / lw:.2f}x (events/s; the whole tee at saturation: {eps / lw:.2f}x)",
                    sw / lw >= 3,
                )
            )
        rt = med(sat["round_trips_per_event"])
        out.append(("≤ 0.02 Redis round trips per event at saturation", f"{rt:.4f}", rt <= 0.02))
    sustained = res.get("saturation", {}).get("sustained", {}).get("sidecar")
    if sustained:
        dropped = sustained["write"]["dropped"]
        rate = sustained["stored_per_s"]
        out.append(
            (
                "issue 15: a long saturating run stores all it relays, ≥ 150,000 events/s",
                f"{sustained['stored']:,}/{sustained['expected_events']:,} stored, {dropped:,.0f}"
                f" dropped, {rate:,.0f} stored events/s",
                dropped == 0 and rate >= 150_000,
            )
        )
    if "1000" in tee:
        wr = tee["1000"]["sidecar"]["write"]
        ok = wr["stored"] == wr["expected"] and wr["dropped"] == 0
        out.append(
            (
                "no write lost at 1,000 concurrent runs",
                f"{wr['stored']:,}/{wr['expected']:,} stored",
                ok,
            )
        )
    rd = res.get("readers", {}).get("summary", {})
    for level, row in rd.items():
        s, p, w = row["sidecar"], row["plain"], row["sidecar"]["write"]
        out.append(
            (
                f"issue 15: {level} streams with a reader each: nothing dropped",
                f"{w['dropped']:.0f} dropped, {w['stored']:,}/{w['expected']:,} stored",
                w["dropped"] == 0 and w["stored"] == w["expected"],
            )
        )
        a, b = med(s["added_p99_us"]), med(p["added_p99_us"])
        out.append(
            (
                f"issue 15: {level} streams with readers: added p99 ≤ 2x the plain proxy's",
                f"{a / 1000:.2f} ms vs {b / 1000:.2f} ms ({a / b:.1f}x)",
                a <= 2 * b,
            )
        )
        fb = med(s["first_byte_p99_us"]) / 1000
        out.append((f"issue 15: {level} streams: first byte p99 < 50 ms", f"{fb:.1f} ms", fb < 50))
        lag = med(s["replay_p99_us"]) / 1000
        out.append(
            (f"issue 15: {level} readers: replay-follow lag p99 < 50 ms", f"{lag:.1f} ms", lag < 50)
        )
        cs, cp = med(w["cpu_us_per_event"]), med(p["cpu_us_per_event"])
        out.append(
            (
                f"issue 15: {level} streams with readers: CPU/event ≤ the plain proxy's",
                f"{cs:.1f} vs {cp:.1f} µs ({cs / cp:.2f}x)",
                cs <= cp,
            )
        )
    sc = res.get("scaling", {}).get("summary", {})
    if "workers1" in sc and "workers2" in sc:
        one, two = med(sc["workers1"]["added_p99_us"]), med(sc["workers2"]["added_p99_us"])
        out.append(
            (
                "issue 15: 2 workers carry 2x the streams at 1 worker's added p99 (within 1.5x)",
                f"{two / 1000:.2f} ms for {sc['workers2']['streams']:,} vs {one / 1000:.2f} ms "
                f"for {sc['workers1']['streams']:,}",
                two <= 1.5 * max(one, 1.0),
            )
        )
    rep = res.get("replay")
    if rep:
        for k, peers in rep["lag_summary"].items():
            p99 = med(peers["sidecar"]["p99_us"]) / 1000
            text = f"{p99:.2f} ms"
            met = p99 < 10
            if "letta" in peers:
                x = med(peers["letta"]["p99_us"]) / 1000 / p99
                if math.isnan(x):
                    # Letta's readers delivered nothing in the window: no ratio to give.
                    text += ", Letta's readers got no event to compare"
                else:
                    text += f", {x:.0f}x better than Letta"
                    met = met and x >= 50
            out.append((f"live-tail lag p99 < 10 ms and ≥ 50x Letta, {k} reader(s)", text, met))
        cu = rep["catchup"]
        c = med(cu["sidecar_default_batch"]["events_per_s"])
        text = f"{c:,.0f} events/s"
        met = c >= 250_000
        if "letta" in cu:
            x = c / med(cu["letta"]["events_per_s"])
            text += f", {x:.2f}x Letta"
            met = met and x >= 2
        out.append(("catch-up ≥ 250,000 events/s and ≥ 2x Letta", text, met))
        if "letta" in cu:
            out.append(
                (
                    "issue 15: catch-up ≥ 1.5x Letta's in-process reader",
                    f"{x:.2f}x ({c:,.0f} vs {med(cu['letta']['events_per_s']):,.0f} events/s)",
                    x >= 1.5,
                )
            )
    for label, r in res.get("idle", {}).items():
        if not label.startswith("sidecar"):
            continue
        idle = r.get("redis_connections_idle", r["redis_connections"])
        ok = idle <= 4 and r["commands_per_s"] <= 1
        out.append(
            (
                f"≤ 4 Redis connections, ≤ 1 command/s, {r['readers']:,} idle readers on "
                f"{r['runs']:,} run{'s' if r['runs'] > 1 else ''}",
                f"{idle} connections ({r['redis_connections']} right after the readers "
                f"opened), {r['commands_per_s']:.2f} commands/s",
                ok,
            )
        )
    return out


def targets_table(res: dict[str, Any]) -> str:
    rows = [
        [t, m, "yes" if ok else ("no" if ok is not None else "n/a")] for t, m, ok in targets(res)
    ]
    return table(["target (issues 7, 15)", "measured (median)", "met"], rows)


def all_tables(res: dict[str, Any]) -> str:
    parts = [
        f"Machine: {one_line(res['machine'])}. Mode: {res['config']['mode']}, "
        f"{res['config']['repeats']} runs each, median ({DASH.join(('min', 'max'))})."
    ]
    if "tee" in res:
        parts += ["### Tee overhead", tee_table(res["tee"], res["config"]["rate"])]
    if "readers" in res:
        parts += [
            "### A replay reader on every run",
            readers_table(res["readers"], res["config"]["rate"]),
        ]
    if "runs" in res:
        parts += ["### Opening runs", runs_table(res["runs"], res["config"]["rate"])]
    if "scaling" in res:
        parts += ["### Worker processes", scaling_table(res["scaling"], res["config"]["rate"])]
    if "saturation" in res:
        parts += ["### Saturation throughput, one process each", saturation_table(res)]
        if res["saturation"].get("sustained"):
            parts += ["### Sustained saturation: what is stored", sustained_table(res)]
    if "tee" in res or "saturation" in res:
        parts += ["### Write path", write_table(res)]
    if "replay" in res:
        parts += ["### Replay", replay_tables(res)]
    if "idle" in res:
        parts += ["### Idle readers", idle_table(res["idle"])]
    parts += ["### Targets", targets_table(res)]
    return "\n\n".join(parts) + "\n"
