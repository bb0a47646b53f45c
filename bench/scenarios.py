"""The measurements. Each scenario repeats its cells ``config.repeats`` times, peers interleaved
with the sidecar inside every repeat (so a noisy moment hits them alike), and keeps every run's
raw figures; the report takes medians and min-max."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from bench.common import proc_cpu_seconds, spread, tree_cpu_seconds
from bench.config import Config
from bench.observe import RedisStats, histogram_delta, redis_connections_of, scrape, total
from bench.procs import Service, Stack, Worker

STREAM_PATH = "/v1/agents/agent-bench/messages/stream"
TARGETS = ("direct", "plain", "sidecar")


# Seconds the tees held their upstream reads for the writer (sidecar/pace.py).
PACED = "sse_sidecar_upstream_paced_seconds_total"


@dataclass
class Bench:
    config: Config
    stack: Stack
    redis_svc: Service
    upstream: Service
    plain: Service
    sidecar: Service
    loadgen: Worker
    letta: Worker | None
    letta_error: str | None
    log: Callable[[str], None]
    # ``--baseline DIR``: a second sidecar from another checkout, measured beside this one in
    # the tee, readers and saturation cells (a before/after ratio from the same run).
    baseline: Service | None = None
    # Sidecars with worker processes (serve --workers N), started by the scaling scenario.
    workers: dict[str, Service] = field(default_factory=dict)
    r: Redis = field(init=False)

    def __post_init__(self) -> None:
        self.r = Redis(host="127.0.0.1", port=self.redis_svc.port)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def targets(self) -> tuple[str, ...]:
        return TARGETS + (("baseline",) if self.baseline is not None else ())

    def sidecar_of(self, target: str) -> Service | None:
        """The sidecar service a target is, if it is one."""
        if target in self.workers:
            return self.workers[target]
        return {"sidecar": self.sidecar, "baseline": self.baseline}.get(target)

    def port_of(self, target: str) -> int:
        svc = {"direct": self.upstream, "plain": self.plain}.get(target) or self.sidecar_of(target)
        assert svc is not None
        return svc.port

    def settle_sidecar(self, timeout: float = 20.0, svc: Service | None = None) -> float:
        """Wait until the sidecar has no run going and nothing left to write; the seconds that
        took."""
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            m = scrape(svc or self.sidecar)
            if (
                total(m, "sse_sidecar_writer_pending_events") == 0
                and total(m, "sse_sidecar_runs_active") == 0
            ):
                return time.monotonic() - start
            time.sleep(0.05)
        self.log("  warning: the sidecar did not settle")
        return time.monotonic() - start

    def stored(self, keys: list[str]) -> int:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.xlen(k)
        return int(sum(pipe.execute()))

    def stored_capped(self, keys: list[str], cap: int) -> int:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.xlen(k)
        return sum(min(int(x), cap) for x in pipe.execute())

    def flush_redis(self) -> None:
        """Drop every run a cell left, but not the epoch key: a sidecar seeing that change would
        take it for Redis losing its data (and mark the runs of the next cell)."""
        keep = {b"sse:run:epoch"}
        batch: list[bytes] = []
        for key in self.r.scan_iter(count=1000):
            if key not in keep:
                batch.append(key)
            if len(batch) >= 1000:
                self.r.unlink(*batch)
                batch.clear()
        if batch:
            self.r.unlink(*batch)

    # -- 1 + 2: tee overhead and write path at each load ---------------------------------------

    def tee(self) -> dict[str, Any]:
        c = self.config
        cells: dict[str, dict[str, list[dict[str, Any]]]] = {
            str(level): {t: [] for t in self.targets} for level in c.levels
        }
        for rep in range(c.repeats):
            for level in c.levels:
                k = rep % len(self.targets)
                order = self.targets[k:] + self.targets[:k]
                for target in order:
                    cell = self._tee_cell(target, level, rep)
                    cells[str(level)][target].append(cell)
                    lat = cell["latency_us"]
                    p50, p99 = lat.get("p50", math.nan), lat.get("p99", math.nan)
                    self.log(
                        f"  tee rep {rep + 1} {level:>4} streams {target:<7} "
                        f"p50 {p50:8.0f} us  p99 {p99:8.0f} us"
                        f"  events {cell['events']}/{cell['expected_events']}"
                        f"  all open after {cell['all_open_s']:.1f} s"
                    )
        return {"cells": cells, "summary": self._tee_summary(cells)}

    def _tee_cell(
        self, target: str, level: int, rep: int, *, readers: bool = False
    ) -> dict[str, Any]:
        """One cell of streams at the token rate; ``readers``: each run of the sidecar is also
        followed by a replay reader (the fault suite's load shape)."""
        c = self.config
        ramp = c.ramp_seconds.get(level, level / 700)
        window = c.window_seconds.get(level, max(c.window_seconds.values()))
        lead = ramp + c.settle_seconds
        n = max(1, round(c.rate * (lead + window)))
        prefix = f"{'rd' if readers else 'tee'}-r{rep}-c{level}-{target}"
        svc = self.sidecar_of(target)
        before = scrape(svc) if svc is not None else None
        rs0 = RedisStats.take(self.r)
        cpu0 = {name: tree_cpu_seconds(svc.pid) for name, svc in self._services().items()}
        args: dict[str, Any] = {
            "port": self.port_of(target),
            "path": STREAM_PATH,
            "count": level,
            "n": n,
            "rate": c.rate,
            "ramp_s": ramp,
            "measure_after_s": lead,
            "run_prefix": prefix,
            "timeout_s": 60 + 3 * n / c.rate,
        }
        if readers and svc is not None:
            res = self.loadgen.call("streams_with_readers", **args)
        else:
            res = self.loadgen.call("streams", measure=True, **args)
        cpu = {
            name: tree_cpu_seconds(svc.pid) - cpu0[name] for name, svc in self._services().items()
        }
        res["cpu_s"] = cpu
        if svc is not None and before is not None:
            self.settle_sidecar(svc=svc)
            after = scrape(svc)
            res["redis"] = RedisStats.take(self.r).minus(rs0)
            res["write"] = write_path(before, after, res["wall_s"])
            res["stored"] = self.stored([f"sse:run:{{{prefix}-{i}}}" for i in range(level)])
            self.flush_redis()
        return res

    def _services(self) -> dict[str, Service]:
        out = {
            "sidecar": self.sidecar,
            "plain": self.plain,
            "upstream": self.upstream,
            "redis": self.redis_svc,
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline
        return {**out, **self.workers}

    def _tee_summary(self, cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for level, by_target in cells.items():
            row: dict[str, Any] = {}
            for target, runs in by_target.items():
                row[target] = {
                    "p50_us": spread([r["latency_us"].get("p50", math.nan) for r in runs]),
                    "p99_us": spread([r["latency_us"].get("p99", math.nan) for r in runs]),
                    "samples": sum(r["latency_us"].get("n", 0) for r in runs),
                    "incomplete": sum(r["streams"] - r["complete"] for r in runs),
                }
            direct = by_target["direct"]
            sidecars = [t for t in by_target if self.sidecar_of(t) is not None]
            for target in ("plain", *sidecars):
                runs = by_target[target]
                for q in ("p50", "p99"):
                    added = [
                        r["latency_us"].get(q, math.nan) - d["latency_us"].get(q, math.nan)
                        for r, d in zip(runs, direct, strict=True)
                    ]
                    row[target][f"added_{q}_us"] = spread(added)
            for t in sidecars:
                side = by_target[t]
                row[t]["write"] = {
                    "events_per_s": spread([r["write"]["events_per_s"] for r in side]),
                    "round_trips_per_event": spread(
                        [r["write"]["round_trips_per_event"] for r in side]
                    ),
                    "flushes_per_event": spread([r["write"]["flushes_per_event"] for r in side]),
                    "batch_mean": spread([r["write"]["batch"]["mean"] for r in side]),
                    "batch_p99_le": spread([r["write"]["batch"]["p99_le"] for r in side]),
                    "cpu_us_per_event": spread(
                        [1e6 * r["cpu_s"][t] / max(r["events"], 1) for r in side]
                    ),
                    "stored": sum(r["stored"] for r in side),
                    "expected": sum(r["expected_events"] for r in side),
                    "dropped": sum(r["write"]["dropped"] for r in side),
                }
            row["plain"]["cpu_us_per_event"] = spread(
                [1e6 * r["cpu_s"]["plain"] / max(r["events"], 1) for r in by_target["plain"]]
            )
            out[level] = row
        return out

    # -- 1b: the fault suite's load shape: a replay reader on every run ------------------------

    def readers(self) -> dict[str, Any]:
        """Streams at the token rate with a live replay reader on each sidecar run, against the
        direct path and the plain proxy (no readers: they cannot replay) in the same repeat."""
        c = self.config
        cells: dict[str, dict[str, list[dict[str, Any]]]] = {
            str(level): {t: [] for t in self.targets} for level in c.reader_levels
        }
        for rep in range(c.repeats):
            for level in c.reader_levels:
                k = rep % len(self.targets)
                for target in self.targets[k:] + self.targets[:k]:
                    cell = self._tee_cell(target, level, rep, readers=True)
                    cells[str(level)][target].append(cell)
                    lat = cell["latency_us"]
                    extra = ""
                    if self.sidecar_of(target) is not None:
                        extra = (
                            f"  replay p99 {cell['replay_lag_us'].get('p99', math.nan):8.0f} us"
                            f"  first byte p99 {cell['first_byte_us'].get('p99', math.nan):8.0f}"
                            f" us  dropped {cell['write']['dropped']:.0f}"
                        )
                    self.log(
                        f"  readers rep {rep + 1} {level:>4} streams {target:<7} "
                        f"p99 {lat.get('p99', math.nan):8.0f} us{extra}"
                        f"  all open after {cell['all_open_s']:.1f} s"
                    )
        summary = self._tee_summary(cells)
        for key, by_target in cells.items():
            for t in (x for x in by_target if self.sidecar_of(x) is not None):
                side = by_target[t]
                summary[key][t].update(
                    {
                        "replay_p50_us": spread(
                            [r["replay_lag_us"].get("p50", math.nan) for r in side]
                        ),
                        "replay_p99_us": spread(
                            [r["replay_lag_us"].get("p99", math.nan) for r in side]
                        ),
                        "first_byte_p50_us": spread(
                            [r["first_byte_us"].get("p50", math.nan) for r in side]
                        ),
                        "first_byte_p99_us": spread(
                            [r["first_byte_us"].get("p99", math.nan) for r in side]
                        ),
                        "readers": sum(r["readers"] for r in side),
                        "readers_complete": sum(r["readers_complete"] for r in side),
                        "cores": spread([r["cpu_s"][t] / r["wall_s"] for r in side]),
                    }
                )
            summary[key]["plain"]["cores"] = spread(
                [r["cpu_s"]["plain"] / r["wall_s"] for r in by_target["plain"]]
            )
        return {"cells": cells, "summary": summary}

    # -- opening runs: what a run costs beyond its events ---------------------------------------

    def runs(self) -> dict[str, Any]:
        """Short runs (``runs_events`` token events, a stop reason and [DONE] at the token rate)
        opened at a steady ``runs_per_s``: the CPU one run costs its path, its few events
        included (the accept, the upstream request, the claim, the tee's and the writer's setup,
        the events, the end), and the first byte (connect and request -> response head) while
        runs keep opening. The plain proxy and the sidecar, which also runs them with a replay
        reader on every run."""
        c = self.config
        cases = [(t, False) for t in self.targets if t != "direct"] + [("sidecar", True)]
        cells: dict[str, list[dict[str, Any]]] = {_case(t, r): [] for t, r in cases}
        for rep in range(c.repeats):
            k = rep % len(cases)
            for target, readers in cases[k:] + cases[:k]:
                cell = self._runs_cell(target, readers, rep)
                cells[_case(target, readers)].append(cell)
                fb = cell["first_byte_us"]
                p50, p99 = fb.get("p50", math.nan) / 1e3, fb.get("p99", math.nan) / 1e3
                self.log(
                    f"  runs rep {rep + 1} {_case(target, readers):<15} "
                    f"CPU {cell['cpu_ms_per_run']:5.2f} ms/run  first byte p50 {p50:6.1f} ms"
                    f"  p99 {p99:6.1f} ms  complete {cell['complete']}/{cell['streams']}"
                )
        summary = {
            case: {
                "runs": c.runs_count,
                "per_s": c.runs_per_s,
                "events": c.runs_events + 2,
                "cpu_ms_per_run": spread([r["cpu_ms_per_run"] for r in runs]),
                "first_byte_p50_us": spread(
                    [r["first_byte_us"].get("p50", math.nan) for r in runs]
                ),
                "first_byte_p99_us": spread(
                    [r["first_byte_us"].get("p99", math.nan) for r in runs]
                ),
                "complete": sum(r["complete"] for r in runs),
                "expected": c.runs_count * len(runs),
            }
            for case, runs in cells.items()
        }
        return {"cells": cells, "summary": summary}

    def _runs_cell(self, target: str, readers: bool, rep: int) -> dict[str, Any]:
        c = self.config
        svc = self.plain if target == "plain" else self.sidecar_of(target)
        assert svc is not None
        args: dict[str, Any] = {
            "port": svc.port,
            "path": STREAM_PATH,
            "count": c.runs_count,
            "n": c.runs_events,
            "rate": c.rate,
            "ramp_s": c.runs_count / c.runs_per_s,
            "measure_after_s": 0.0,
            "run_prefix": f"open-{target}{'-read' if readers else ''}-{rep}",
            "timeout_s": 60.0,
        }
        cpu0 = tree_cpu_seconds(svc.pid)
        if readers:
            res = self.loadgen.call("streams_with_readers", **args)
        else:
            res = self.loadgen.call("streams", measure=False, **args)
        # Taken once every run ended, before the settle's metric scrapes (which cost the sidecar
        # CPU of their own); only the writer's last round trip may be left out.
        res["cpu_ms_per_run"] = (tree_cpu_seconds(svc.pid) - cpu0) * 1e3 / c.runs_count
        if target != "plain":
            self.settle_sidecar(svc=svc)
            self.flush_redis()
        return res

    # -- 1c: worker processes (serve --workers N) ------------------------------------------------

    def scaling(self) -> dict[str, Any]:
        """N worker processes carry N x ``scaling_streams`` streams, a replay reader on each, and
        a saturation cell; the plain proxy carries the same streams for the ratio."""
        c = self.config
        for n in c.scaling_workers:
            name = f"workers{n}"
            if name not in self.workers:
                svc = self.stack.sidecar(
                    self.upstream, self.redis_svc, name=name, flags=("--workers", str(n))
                )
                self.stack.wait(svc)
                self._all_workers_ready(svc, n)
                self.workers[name] = svc
        cells: dict[str, list[dict[str, Any]]] = {f"workers{n}": [] for n in c.scaling_workers}
        plain: dict[str, list[dict[str, Any]]] = {f"workers{n}": [] for n in c.scaling_workers}
        direct: dict[str, list[dict[str, Any]]] = {f"workers{n}": [] for n in c.scaling_workers}
        sat: dict[str, list[dict[str, Any]]] = {f"workers{n}": [] for n in c.scaling_workers}
        for rep in range(c.repeats):
            for n in c.scaling_workers:
                name, level = f"workers{n}", n * c.scaling_streams
                direct[name].append(self._tee_cell("direct", level, rep))
                plain[name].append(self._tee_cell("plain", level, rep))
                cell = self._tee_cell(name, level, rep, readers=True)
                cells[name].append(cell)
                sat[name].append(self.saturation_cell(name, "null", rep))
                self.log(
                    f"  scaling rep {rep + 1} {n} worker(s) {level:>5} streams: p99 "
                    f"{cell['latency_us'].get('p99', math.nan):8.0f} us (plain "
                    f"{plain[name][-1]['latency_us'].get('p99', math.nan):8.0f} us), replay p99 "
                    f"{cell['replay_lag_us'].get('p99', math.nan):8.0f} us, dropped "
                    f"{cell['write']['dropped']:.0f}, saturation "
                    f"{sat[name][-1]['events_per_s']:9.0f} events/s"
                )
        summary: dict[str, Any] = {}
        for name, runs in cells.items():
            added = [
                r["latency_us"].get("p99", math.nan) - d["latency_us"].get("p99", math.nan)
                for r, d in zip(runs, direct[name], strict=True)
            ]
            plain_added = [
                r["latency_us"].get("p99", math.nan) - d["latency_us"].get("p99", math.nan)
                for r, d in zip(plain[name], direct[name], strict=True)
            ]
            summary[name] = {
                "workers": int(name.removeprefix("workers")),
                "streams": runs[0]["streams"],
                "added_p99_us": spread(added),
                "plain_added_p99_us": spread(plain_added),
                "replay_p99_us": spread([r["replay_lag_us"].get("p99", math.nan) for r in runs]),
                "first_byte_p99_us": spread(
                    [r["first_byte_us"].get("p99", math.nan) for r in runs]
                ),
                "cpu_us_per_event": spread(
                    [1e6 * r["cpu_s"][name] / max(r["events"], 1) for r in runs]
                ),
                "dropped": sum(r["write"]["dropped"] for r in runs),
                "incomplete": sum(r["streams"] - r["complete"] for r in runs),
                "sat_events_per_s": spread([x["events_per_s"] for x in sat[name]]),
                "sat_cores": spread([x["target_cores"] for x in sat[name]]),
            }
        return {"cells": cells, "plain": plain, "saturation": sat, "summary": summary}

    def _all_workers_ready(self, svc: Service, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{svc.extra['admin']}/readyz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.loads(resp.read())
                # One worker is a plain single process: ready is its own /readyz.
                workers = body.get("workers", [{"ready": True}])
                if sum(1 for w in workers if w["ready"]) == n:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{svc.name}: not all {n} workers ready within {timeout}s")

    # -- 1: saturation ------------------------------------------------------------------------

    def saturation(self) -> dict[str, Any]:
        c = self.config
        variants = [
            ("direct", "null"),
            ("plain", "null"),
            ("sidecar", "null"),
            ("sidecar", "filled"),
        ]
        if self.baseline is not None:
            variants.append(("baseline", "null"))
        runs: dict[str, list[dict[str, Any]]] = {f"{t}:{ids}": [] for t, ids in variants}
        for rep in range(c.repeats):
            k = rep % len(variants)
            for target, ids in variants[k:] + variants[:k]:
                cell = self.saturation_cell(target, ids, rep)
                runs[f"{target}:{ids}"].append(cell)
                cores = cell.get("target_cores")
                self.log(
                    f"  saturation rep {rep + 1} {target:<7} ids={ids:<6} "
                    f"{cell['events_per_s']:9.0f} events/s"
                    + (f"  target CPU {cores:.2f} cores" if cores is not None else "")
                )
        summary: dict[str, Any] = {}
        for key, cells in runs.items():
            summary[key] = {
                "events_per_s": spread([x["events_per_s"] for x in cells]),
                "events_per_cpu_s": spread([x.get("events_per_cpu_s", math.nan) for x in cells]),
                "target_cores": spread([x.get("target_cores", math.nan) for x in cells]),
                "upstream_cores": spread([x["cpu_s"]["upstream"] / x["wall_s"] for x in cells]),
                "loadgen_cores": spread([x["loadgen_cpu_s"] / x["wall_s"] for x in cells]),
                "redis_cores": spread([x["cpu_s"]["redis"] / x["wall_s"] for x in cells]),
                "incomplete": sum(x["streams"] - x["complete"] for x in cells),
            }
            if self.sidecar_of(key.split(":")[0]) is not None:
                summary[key]["round_trips_per_event"] = spread(
                    [x["write"]["round_trips_per_event"] for x in cells]
                )
                summary[key]["batch_mean"] = spread([x["write"]["batch"]["mean"] for x in cells])
                summary[key]["stored"] = sum(x["stored"] for x in cells)
                summary[key]["expected"] = sum(x["expected_events"] for x in cells)
        return {"cells": runs, "summary": summary, "sustained": self.sustained()}

    def sustained(self) -> dict[str, dict[str, Any]]:
        """One long saturating cell per sidecar (issue 15: throughput counts what is stored):
        what was relayed, what was stored, how long the writer took after the streams ended."""
        c = self.config
        out: dict[str, dict[str, Any]] = {}
        for target in ["sidecar"] + (["baseline"] if self.baseline is not None else []):
            cell = self.saturation_cell(target, "null", c.repeats, events=c.sustained_events)
            stored_s = cell["wall_s"] + cell["settle_s"]
            cell["stored_per_s"] = cell["stored"] / stored_s
            out[target] = cell
            self.log(
                f"  sustained {target:<8} relayed {cell['events_per_s']:9.0f} events/s, stored "
                f"{cell['stored']:,}/{cell['expected_events']:,} at {cell['stored_per_s']:9.0f}/s,"
                f" dropped {cell['write']['dropped']:,.0f}, held {cell['paced_s']:.1f} s"
            )
        return out

    def saturation_cell(
        self, target: str, ids: str, rep: int, events: int | None = None
    ) -> dict[str, Any]:
        c = self.config
        n = events or c.sat_events
        prefix = f"sat-r{rep}-{target}-{ids}"
        side = self.sidecar_of(target)
        before = scrape(side) if side is not None else None
        cpu0 = {name: tree_cpu_seconds(svc.pid) for name, svc in self._services().items()}
        lg0 = self.loadgen.cpu()
        res = self.loadgen.call(
            "streams",
            port=self.port_of(target),
            path=STREAM_PATH,
            count=c.sat_streams,
            n=n,
            rate=0,
            ids=ids,
            run_prefix=prefix,
            measure=False,
            timeout_s=300,
        )
        res["cpu_s"] = {
            name: tree_cpu_seconds(svc.pid) - cpu0[name] for name, svc in self._services().items()
        }
        res["loadgen_cpu_s"] = self.loadgen.cpu() - lg0
        if target == "plain" or side is not None:
            res["target_cores"] = res["cpu_s"][target] / res["wall_s"]
            res["events_per_cpu_s"] = res["events"] / max(res["cpu_s"][target], 1e-9)
        if side is not None and before is not None:
            res["settle_s"] = self.settle_sidecar(timeout=120.0, svc=side)
            after = scrape(side)
            res["paced_s"] = total(after, PACED) - total(before, PACED)
            res["write"] = write_path(before, after, res["wall_s"])
            keys = [f"sse:run:{{{prefix}-{i}}}" for i in range(c.sat_streams)]
            res["stored"] = self.stored(keys)
            self.flush_redis()
        return res

    # -- writers alone (sidecar's and Letta's), and Letta at 1,000 concurrent runs --------------

    def writers(self) -> dict[str, Any]:
        c = self.config
        side: list[dict[str, Any]] = []
        letta: list[dict[str, Any]] = []
        for rep in range(c.repeats):
            prefix = f"wa-r{rep}"
            rs0 = RedisStats.take(self.r)
            res = self.loadgen.call(
                "writer_alone",
                redis_url=f"redis://127.0.0.1:{self.redis_svc.port}/0",
                runs=c.writer_runs,
                n=c.writer_events,
                prefix=prefix,
            )
            res["redis"] = RedisStats.take(self.r).minus(rs0)
            res["round_trips_per_event"] = res["round_trips"] / res["events"]
            side.append(res)
            self.flush_redis()
            self.log(
                f"  writer alone rep {rep + 1} sidecar {res['events_per_s']:9.0f} events/s "
                f"({res['events_per_cpu_s']:.0f}/CPU-s)"
            )
            if self.letta is not None:
                ids = [f"lw-r{rep}-{i}" for i in range(c.writer_runs)]
                rs0 = RedisStats.take(self.r)
                lres = self.letta.call(
                    "writer", port=self.redis_svc.port, run_ids=ids, n=c.writer_events
                )
                lres["redis"] = RedisStats.take(self.r).minus(rs0)
                # One EXPIRE per pipeline: Letta's round trips.
                rt = lres["redis"]["by_command"].get("expire", 0.0)
                lres["round_trips"] = rt
                lres["round_trips_per_event"] = rt / lres["chunks"]
                # n + 2 chunks per run (+ the finalizer's extra [DONE], not counted).
                lres["stored"] = self.stored_capped(
                    [f"sse:run:{i}" for i in ids], c.writer_events + 2
                )
                # Throughput counts what reached Redis, not what was handed to the writer.
                lres["chunks_per_s"] = lres["stored"] / lres["wall_s"]
                lres["chunks_per_cpu_s"] = lres["stored"] / max(lres["cpu_s"], 1e-9)
                letta.append(lres)
                self.flush_redis()
                self.log(
                    f"  writer alone rep {rep + 1} letta   {lres['chunks_per_s']:9.0f} chunks/s "
                    f"({lres['chunks_per_cpu_s']:.0f}/CPU-s)"
                )
        out: dict[str, Any] = {
            "sidecar": side,
            "sidecar_summary": {
                "events_per_s": spread([x["events_per_s"] for x in side]),
                "events_per_cpu_s": spread([x["events_per_cpu_s"] for x in side]),
                "round_trips_per_event": spread([x["round_trips_per_event"] for x in side]),
                "stored": sum(x["stored"] for x in side),
                "expected": sum(x["events"] for x in side),
            },
        }
        if letta:
            out["letta"] = letta
            out["letta_summary"] = {
                "events_per_s": spread([x["chunks_per_s"] for x in letta]),
                "events_per_cpu_s": spread([x["chunks_per_cpu_s"] for x in letta]),
                "round_trips_per_event": spread([x["round_trips_per_event"] for x in letta]),
                "stored": sum(x["stored"] for x in letta),
                "expected": sum(x["chunks"] for x in letta),
                "errors": sum(sum(x["errors"].values()) for x in letta),
            }
            out["letta_paced"] = self._letta_paced()
        return out

    def _letta_paced(self) -> dict[str, Any]:
        """Letta's writer with 1,000 runs streaming at the token rate at once: lost writes?"""
        assert self.letta is not None
        c = self.config
        n = max(1, round(c.rate * c.paced_seconds))
        ids = [f"lp-{i}" for i in range(c.paced_runs)]
        res = self.letta.call("writer", port=self.redis_svc.port, run_ids=ids, n=n, rate=c.rate)
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.xlen(f"sse:run:{i}")
        lens = [int(x) for x in pipe.execute()]
        # n + 2 chunks per run (+ the finalizer's extra [DONE] when it got through).
        res["expected"] = len(ids) * (n + 2)
        res["stored"] = sum(min(x, n + 2) for x in lens)
        res["runs_short"] = sum(1 for x in lens if x < n + 2)
        res["runs_empty"] = sum(1 for x in lens if x == 0)
        self.flush_redis()
        self.log(
            f"  letta writer, {c.paced_runs} paced runs: stored {res['stored']}/{res['expected']} "
            f"chunks, {res['runs_short']} runs short"
        )
        return res

    # -- 3: replay ----------------------------------------------------------------------------

    def replay(self) -> dict[str, Any]:
        c = self.config
        lag: dict[str, dict[str, list[dict[str, Any]]]] = {
            str(k): {"sidecar": [], "letta": []} for k in c.lag_readers
        }
        for rep in range(c.repeats):
            for readers in c.lag_readers:
                run_id = f"lag-r{rep}-k{readers}"
                ramp = c.lag_ramp_seconds if readers > 1 else 0.0
                before = scrape(self.sidecar)
                cpu0 = (self.sidecar.cpu(), self.loadgen.cpu())
                res = self.loadgen.call(
                    "replay_lag",
                    port=self.sidecar.port,
                    path=STREAM_PATH,
                    run_id=run_id,
                    readers=readers,
                    rate=c.rate,
                    ramp_s=ramp,
                    window_s=c.lag_seconds,
                )
                res["sidecar_cores"] = (self.sidecar.cpu() - cpu0[0]) / res["wall_s"]
                res["loadgen_cores"] = (self.loadgen.cpu() - cpu0[1]) / res["wall_s"]
                self.settle_sidecar()
                after = scrape(self.sidecar)
                res["delivery_lag"] = histogram_delta(
                    before, after, "sse_sidecar_replay_delivery_lag_seconds"
                )
                # Readers the sidecar cut as too slow or outrun by the length cap.
                res["slow_reader_cuts"] = total(
                    after, "sse_sidecar_replay_requests_total", outcome="slow_reader"
                ) - total(before, "sse_sidecar_replay_requests_total", outcome="slow_reader")
                lag[str(readers)]["sidecar"].append(res)
                self.log(
                    f"  live tail rep {rep + 1} {readers:>4} readers sidecar "
                    f"p50 {res['lag_us'].get('p50', math.nan):9.0f} us p99 "
                    f"{res['lag_us'].get('p99', math.nan):9.0f} us"
                    f"  complete {res['complete_readers']}"
                    f"  connect {res['connect_s']:.1f} s  sidecar {res['sidecar_cores']:.2f} cores"
                )
                if self.letta is not None:
                    lres = self.letta.call(
                        "lag",
                        port=self.redis_svc.port,
                        run_id=f"l{run_id}",
                        readers=readers,
                        rate=c.rate,
                        ramp_s=ramp,
                        window_s=c.lag_seconds,
                    )
                    lag[str(readers)]["letta"].append(lres)
                    self.log(
                        f"  live tail rep {rep + 1} {readers:>4} readers letta   "
                        f"p50 {lres['lag_us'].get('p50', math.nan):9.0f} us p99 "
                        f"{lres['lag_us'].get('p99', math.nan):9.0f} us"
                        f"  complete {lres['complete_readers']}"
                    )
                self.flush_redis()
        lag_summary: dict[str, Any] = {}
        for k, peers in lag.items():
            lag_summary[k] = {
                peer: {
                    "p50_us": spread([x["lag_us"].get("p50", math.nan) for x in runs]),
                    "p99_us": spread([x["lag_us"].get("p99", math.nan) for x in runs]),
                    "samples": sum(x["lag_us"].get("n", 0) for x in runs),
                    "complete_readers": spread([x["complete_readers"] for x in runs]),
                    "errors": _merge([x["errors"] for x in runs]),
                }
                for peer, runs in peers.items()
                if runs
            }
        return {"lag": lag, "lag_summary": lag_summary, "catchup": self._catchup()}

    def _catchup(self) -> dict[str, Any]:
        c = self.config
        run_id = "catchup-10k"
        made = self.loadgen.call(
            "streams",
            port=self.sidecar.port,
            path=STREAM_PATH,
            count=1,
            n=c.catchup_events - 2,
            rate=0,
            run_prefix=run_id,
            measure=False,
        )
        self.settle_sidecar()
        rid = f"{run_id}-0"
        stored = self.stored([f"sse:run:{{{rid}}}"])
        out: dict[str, Any] = {"events": c.catchup_events, "stored": stored, "made": made["events"]}
        for label, batch in (("sidecar_default_batch", None), ("sidecar_batch_1000", 1000)):
            res = self.loadgen.call(
                "catchup",
                port=self.sidecar.port,
                run_id=rid,
                events=c.catchup_events,
                repeats=c.catchup_repeats,
                batch_size=batch,
            )
            out[label] = {"events_per_s": spread(res["events_per_s"]), "errors": res["errors"]}
            self.log(f"  catch-up {label}: {out[label]['events_per_s']['median']:.0f} events/s")
        if self.letta is not None:
            res = self.letta.call(
                "catchup",
                port=self.redis_svc.port,
                run_id="lcatchup-10k",
                n=c.catchup_events - 2,
                repeats=c.catchup_repeats,
            )
            out["letta"] = {"events_per_s": spread(res["events_per_s"]), "events": res["events"]}
            self.log(f"  catch-up letta: {out['letta']['events_per_s']['median']:.0f} events/s")
        self.flush_redis()
        return out

    def idle(self) -> dict[str, Any]:
        """Idle readers; run first, while the sidecar and Letta processes are fresh, so that the
        RSS they add is not hidden in memory an earlier scenario left allocated."""
        c = self.config
        out: dict[str, Any] = {}
        k = c.idle_readers
        cases = [("sidecar", k, 1), ("sidecar", 1, k)]
        if self.letta is not None:
            cases += [("letta", k, 1), ("letta", 1, k)]
        for peer, runs, per_run in cases:
            label = f"{peer}:{runs}runs_x{per_run}"
            run_ids = [f"idle-{peer}-{runs}-{i}" for i in range(runs)]
            res = self._idle_case(peer, run_ids, per_run)
            out[label] = res
            self.log(
                f"  idle {k} readers on {runs} run(s) {peer:<7}: {res['redis_connections']} Redis "
                f"connections after opening, {res['redis_connections_idle']} at the end, "
                f"{res['commands_per_s']:.1f} commands/s, "
                f"RSS +{res['rss_delta_mib']:.1f} MiB, "
                f"{res['closed']['alive_at_close']} readers still streaming"
            )
            self.flush_redis()
        return out

    def _idle_case(self, peer: str, run_ids: list[str], per_run: int) -> dict[str, Any]:
        c = self.config
        worker = self.loadgen if peer == "sidecar" else self.letta
        assert worker is not None
        pid = self.sidecar.pid if peer == "sidecar" else worker.pid
        if peer == "sidecar":
            worker.call(
                "make_runs",
                redis_url=f"redis://127.0.0.1:{self.redis_svc.port}/0",
                run_ids=run_ids,
                lease_s=3600,
            )
        else:
            worker.call("make_runs", port=self.redis_svc.port, run_ids=run_ids)
        conns0 = redis_connections_of(self.r, pid)
        rss0 = _rss(pid)
        ramp = c.idle_ramp_seconds
        opened = worker.call(
            "open_readers",
            port=self.sidecar.port if peer == "sidecar" else self.redis_svc.port,
            run_ids=run_ids,
            per_run=per_run,
            ramp_s=ramp,
        )
        time.sleep(0.5)
        conns = redis_connections_of(self.r, pid)
        rs0 = RedisStats.take(self.r)
        t0 = time.perf_counter()
        cpu0 = proc_cpu_seconds(pid)
        # The sidecar's heartbeat work happens once per 15 s: its window covers one. Letta's
        # readers poll steadily, so a shorter window measures their rate as well.
        time.sleep(c.idle_window_seconds if peer == "sidecar" else min(c.idle_window_seconds, 5))
        window = time.perf_counter() - t0
        cpu = proc_cpu_seconds(pid) - cpu0
        delta = RedisStats.take(self.r).minus(rs0)
        # At the window's end: the connections idle readers hold (the opening burst's extra
        # pooled connections are closed once unused, connect.POOL_IDLE_SECONDS).
        conns_idle = redis_connections_of(self.r, pid)
        rss = _rss(pid)
        closed = worker.call("close_readers")
        return {
            "readers": len(run_ids) * per_run,
            "runs": len(run_ids),
            "open": opened,
            "closed": closed,
            "redis_connections_before": conns0,
            "redis_connections": conns,
            "redis_connections_idle": conns_idle,
            "window_s": window,
            "commands_per_s": delta["commands"] / window,
            "by_command_per_s": {k: v / window for k, v in delta["by_command"].items()},
            "cpu_cores": cpu / window,
            "rss_before_mib": rss0 / 2**20,
            "rss_delta_mib": (rss - rss0) / 2**20,
        }

    # -- 4: redis-benchmark --------------------------------------------------------------------

    def redis_benchmark(self) -> dict[str, Any]:
        c = self.config
        payload = "x" * 150
        out: dict[str, Any] = {}
        for clients in (1, 50):
            rates: list[float] = []
            for _ in range(c.repeats):
                argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.redis_svc.port)]
                argv += ["-c", str(clients), "-n", str(c.rb_requests), "-P", "50", "--csv"]
                argv += ["XADD", "bench:k", "*", "data", payload]
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith('"XADD')][-1]
                rates.append(float(line.split(",")[1].strip('"')))
                self.r.delete("bench:k")
            out[f"c{clients}"] = spread(rates)
            self.log(
                f"  redis-benchmark XADD -P 50 -c {clients}: {out[f'c{clients}']['median']:.0f}/s"
            )
        return out


def write_path(before: dict[Any, float], after: dict[Any, float], wall_s: float) -> dict[str, Any]:
    """What the sidecar's writer did between two scrapes."""
    events = total(after, "sse_sidecar_stream_events_total") - total(
        before, "sse_sidecar_stream_events_total"
    )
    flushes = total(after, "sse_sidecar_flushes_total") - total(before, "sse_sidecar_flushes_total")
    claims = total(after, "sse_sidecar_runs_started_total") - total(
        before, "sse_sidecar_runs_started_total"
    )
    dropped = total(after, "sse_sidecar_writer_dropped_events_total") - total(
        before, "sse_sidecar_writer_dropped_events_total"
    )
    return {
        "events": events,
        "events_per_s": events / wall_s if wall_s else math.nan,
        "flushes": flushes,
        "claims": claims,
        # A claim (the run's first round trip, before its response starts) is one more.
        "round_trips_per_event": (flushes + claims) / events if events else math.nan,
        "flushes_per_event": flushes / events if events else math.nan,
        "batch": histogram_delta(before, after, "sse_sidecar_flush_batch_events"),
        "flush_seconds": histogram_delta(before, after, "sse_sidecar_flush_duration_seconds"),
        "dropped": dropped,
    }


def _rss(pid: int) -> int:
    from bench.common import proc_rss_bytes

    return proc_rss_bytes(pid)


def _merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _case(target: str, readers: bool) -> str:
    return f"{target}+reader" if readers else target
