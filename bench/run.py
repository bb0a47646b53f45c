"""``python -m bench [--quick] [--only SCENARIO ...] [--profile]``: the benchmark driver.

It starts a private redis-server, the bench upstream, a plain aiohttp proxy, ``python -m sidecar
serve`` (defaults, but for addresses), the load generator and, when its virtualenv is there, the
Letta peer; runs the scenarios; prints a table per scenario; writes every raw figure as JSON
under ``bench/results/<mode>/``. ``make bench`` / ``make bench-quick`` set everything up first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import report
from bench.config import FULL, QUICK, Config
from bench.machine import describe, one_line
from bench.procs import LETTA_PYTHON, LETTA_SETUP_LOG, ROOT, Stack
from bench.readme import section
from bench.scenarios import STREAM_PATH, Bench

RESULTS = ROOT / "bench" / "results"
TOOLS = ROOT / "bench" / ".venv-tools" / "bin"
# idle first: the sidecar and Letta processes are fresh, so the RSS readers add is visible.
SCENARIOS = (
    "idle",
    "tee",
    "readers",
    "runs",
    "scaling",
    "saturation",
    "writers",
    "replay",
    "redis_benchmark",
)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def letta_unavailable() -> str | None:
    if LETTA_PYTHON.exists():
        return None
    reason = "bench/.venv-letta is missing (run `make bench`, which creates it)"
    if LETTA_SETUP_LOG.exists():
        tail = LETTA_SETUP_LOG.read_text(errors="replace").strip().splitlines()[-15:]
        reason = "installing letta 0.16.x failed:\n" + "\n".join(tail)
    return reason


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _exit_on_sigterm() -> None:
    """SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the stack's processes stop."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--repeats", type=int, help="override the number of repeated runs")
    parser.add_argument(
        "--levels", type=int, nargs="+", help="override the tee and readers stream counts"
    )
    parser.add_argument("--no-letta", action="store_true", help="leave the Letta peer out")
    parser.add_argument(
        "--profile",
        metavar="SECONDS",
        type=float,
        help="instead of the suite: py-spy the sidecar for SECONDS under --profile-load",
    )
    parser.add_argument("--profile-load", choices=PROFILE_LOADS, default="saturation")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/MODE)")
    parser.add_argument("--note", default="", help="a paragraph for the README section")
    parser.add_argument(
        "--sidecar-flags",
        default="",
        metavar="FLAGS",
        help="extra `sse-sidecar serve` flags for the sidecar under test (e.g. '--workers 2')",
    )
    parser.add_argument(
        "--sidecar-root",
        type=Path,
        metavar="DIR",
        help="import the sidecar under test from DIR instead of this checkout",
    )
    parser.add_argument(
        "--baseline-flags", default="", metavar="FLAGS", help="the same, for --baseline"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the sidecar package found in DIR (e.g. `git archive main sidecar | tar -x "
        "-C DIR`) beside this one, interleaved in the tee, readers and saturation cells",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.repeats:
        config = Config(**{**config.__dict__, "repeats": args.repeats})
    if args.levels:
        levels = tuple(args.levels)
        config = Config(
            **{
                **config.__dict__,
                "levels": levels,
                "reader_levels": levels,
                "window_seconds": {n: config.window_seconds.get(n, 3.0) for n in levels},
                "ramp_seconds": {n: config.ramp_seconds.get(n, n / 700) for n in levels},
            }
        )
    out = args.out or RESULTS / config.mode
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    stack = Stack(workdir)
    try:
        redis_svc = stack.redis()
        upstream = stack.upstream()
        plain = stack.plain_proxy(upstream)
        sidecar = stack.sidecar(
            upstream, redis_svc, root=args.sidecar_root, flags=tuple(args.sidecar_flags.split())
        )
        baseline = None
        if args.baseline is not None:
            baseline = stack.sidecar(
                upstream,
                redis_svc,
                name="baseline",
                root=args.baseline,
                flags=tuple(args.baseline_flags.split()),
            )
        loadgen = stack.loadgen()
        want = set(args.only or SCENARIOS)
        letta_error = "left out (--no-letta)" if args.no_letta else letta_unavailable()
        letta = None
        letta_version = None
        if letta_error is None and args.profile is None and want & {"writers", "replay", "idle"}:
            letta = stack.letta()
        stack.wait(upstream, plain, sidecar, *([baseline] if baseline else []))
        loadgen.wait_ready()
        if letta is not None:
            try:
                letta_version = letta.call("info")["letta"]
            except (RuntimeError, TimeoutError) as exc:
                letta_error = f"the Letta peer did not start: {exc}"
                letta = None
        bench = Bench(
            config,
            stack,
            redis_svc,
            upstream,
            plain,
            sidecar,
            loadgen,
            letta,
            letta_error,
            log,
            baseline=baseline,
        )
        redis_version = str(bench.r.info("server")["redis_version"])
        machine = describe(redis_version, letta_version)
        log(f"bench ({config.mode}) on {one_line(machine)}")
        log(f"work directory (logs): {workdir}")
        if letta_error:
            log(f"Letta peer unavailable: {letta_error}")
        if args.profile is not None:
            return profile(bench, args.profile, args.profile_load, out)
        results: dict[str, Any] = {
            "machine": machine,
            "config": config.as_dict(),
            "letta_error": letta_error,
            "command": "make bench" if config.mode == "full" else "make bench-quick",
        }
        for name in SCENARIOS:
            if name not in want:
                continue
            t0 = time.perf_counter()
            log(f"== {name}")
            results[name] = getattr(bench, name)()
            results.setdefault("seconds", {})[name] = time.perf_counter() - t0
            write_json(
                out / f"{name}.json",
                {"machine": machine, "config": results["config"], name: results[name]},
            )
        machine["loadavg_end"] = os.getloadavg()
        results["total_seconds"] = time.perf_counter() - started
        write_json(out / "summary.json", results)
        tables = report.all_tables(results)
        (out / "tables.md").write_text(tables)
        log("")
        print(tables, flush=True)
        log(f"results: {_shown(out)}/ ({results['total_seconds']:.0f} s in all)")
        if not args.only:
            full = config.mode == "full" and args.out is None and args.repeats is None
            target = ROOT / "bench" / "README-section.md" if full else out / "README-section.md"
            target.write_text(section(results, tables, args.note))
            log(f"README section: {_shown(target)}")
        return 0
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True) if os.environ.get(
            "BENCH_KEEP_LOGS"
        ) is None else None


# -- profiling ---------------------------------------------------------------------------------


PROFILE_LOADS = (
    "saturation",
    "streams100",
    "streams100readers",
    "streams1000",
    "streams1000readers",
    "readers1000",
    "catchup",
    "runs",
)


def profile(bench: Bench, seconds: float, load: str, out: Path) -> int:
    """py-spy the sidecar under one load; the top functions by self and total samples.

    Loads: ``saturation`` (the saturation scenario's streams, sized to outlast the recording),
    ``streams100`` and ``streams1000`` (100 or 1,000 streams at the token rate),
    ``streams100readers`` and ``streams1000readers`` (as many with a replay reader on every
    run: the readers scenario), ``readers1000`` (1,000 live-tail
    readers of one run at the token rate), ``catchup`` (one reader reading a finished
    10,000-event run from the start, again and again) and ``runs`` (short runs opened one
    after another at ``runs_per_s``, a replay reader on each: the runs scenario's cost of
    opening a run).
    """
    spy = TOOLS / "py-spy"
    if not spy.exists():
        log("py-spy is missing: bench/setup.sh installs it in bench/.venv-tools")
        return 1
    c = bench.config
    raw = out / f"profile-{load}.txt"
    svg = out / f"profile-{load}.svg"
    results: dict[str, Any] = {}
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        argv = [
            str(spy),
            "record",
            "--pid",
            str(bench.sidecar.pid),
            "--duration",
            str(int(seconds)),
        ]
        argv += ["--rate", "200", "--nonblocking", "--format", fmt, "-o", str(path)]
        spies: list[subprocess.Popen[bytes]] = []

        def start(argv: list[str] = argv, spies: list[subprocess.Popen[bytes]] = spies) -> None:
            spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

        if load == "saturation":
            warm = bench.saturation_cell("sidecar", "null", 0)
            n = int(warm["events_per_s"] * (seconds + 3) / c.sat_streams) + 1
            timer = threading.Timer(1.0, start)
            timer.start()
            results[fmt] = bench.saturation_cell("sidecar", "null", 1, events=n)
        elif load in ("streams100", "streams100readers", "streams1000", "streams1000readers"):
            timer = threading.Timer(2.5, start)
            timer.start()
            results[fmt] = bench.loadgen.call(
                "streams_with_readers" if load.endswith("readers") else "streams",
                port=bench.sidecar.port,
                path=STREAM_PATH,
                count=100 if load in ("streams100", "streams100readers") else 1000,
                n=int(c.rate * (seconds + 4)),
                rate=c.rate,
                ramp_s=1.0,
                measure_after_s=2.5,
                run_prefix=f"prof-{fmt}",
            )
        elif load == "runs":
            timer = threading.Timer(1.5, start)
            timer.start()
            count = int(c.runs_per_s * (seconds + 3))
            results[fmt] = bench.loadgen.call(
                "streams_with_readers",
                port=bench.sidecar.port,
                path=STREAM_PATH,
                count=count,
                n=c.runs_events,
                rate=c.rate,
                ramp_s=count / c.runs_per_s,
                measure_after_s=0.0,
                run_prefix=f"prof-runs-{fmt}",
                timeout_s=seconds + 60,
            )
        elif load == "catchup":
            run_id = f"prof-catchup-{fmt}"
            bench.loadgen.call(
                "streams",
                port=bench.sidecar.port,
                path=STREAM_PATH,
                count=1,
                n=c.catchup_events - 2,
                rate=0,
                run_prefix=run_id,
                measure=False,
            )
            bench.settle_sidecar()
            timer = threading.Timer(1.0, start)
            timer.start()
            results[fmt] = bench.loadgen.call(
                "catchup",
                port=bench.sidecar.port,
                run_id=f"{run_id}-0",
                events=c.catchup_events,
                # Enough catch-ups to outlast the profile at up to 200k events/s (sized by the
                # run's length: 40 a second was right for 10,000 events, 100,000 outlasted the
                # load generator's timeout).
                repeats=max(2, int((seconds + 2) * 200_000 / c.catchup_events)),
            )
        else:
            timer = threading.Timer(3.0, start)
            timer.start()
            results[fmt] = bench.loadgen.call(
                "replay_lag",
                port=bench.sidecar.port,
                path=STREAM_PATH,
                run_id=f"prof-{fmt}",
                readers=1000,
                rate=c.rate,
                ramp_s=1.0,
                window_s=seconds + 2,
            )
        timer.join()
        _, err = spies[0].communicate(timeout=seconds + 60)
        if spies[0].returncode != 0:
            log(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
            return 1
        bench.settle_sidecar()
        bench.flush_redis()
    top = hot_spots(raw.read_text())
    write_json(out / f"profile-{load}.json", {"load": load, "results": results, "top": top})
    log(f"sidecar under {load}, py-spy {seconds:g} s, {top['samples']} samples:")
    rows = [[f, f"{s:.1f}", f"{t:.1f}"] for f, s, t in top["rows"]]
    print(report.table(["function (file)", "self %", "total %"], rows), flush=True)
    rows = [[f, f"{t:.1f}"] for f, t in top["inclusive"][:40]]
    print(report.table(["function (file)", "total %"], rows), flush=True)
    log(f"flame graph: {_shown(svg)}; collapsed stacks: {_shown(raw)}")
    return 0


def hot_spots(collapsed: str, limit: int = 30) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        # Functions only (py-spy's frames are "name (file:line)"): drop the line for totals.
        names = [_func(f) for f in frames]
        self_n[names[-1]] += n
        for name in set(names):
            incl[name] += n
    rows = [
        (name, 100 * self_n[name] / total, 100 * incl[name] / total)
        for name, _ in self_n.most_common(limit)
    ]
    return {
        "samples": total,
        "rows": rows,
        "inclusive": [(k, 100 * v / total) for k, v in incl.most_common(60)],
    }


def _func(frame: str) -> str:
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    file = file.replace(str(ROOT) + "/", "")
    return f"{name} ({file})"


if __name__ == "__main__":
    sys.exit(main())
