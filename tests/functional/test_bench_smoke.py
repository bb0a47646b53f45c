"""``make bench-quick`` as a smoke test: every scenario of the benchmark suite runs against the
real sidecar and writes its tables (issue 15: the bench must keep working in CI).

Nothing here is timed: the figures of a run on a shared CI machine say nothing, so only what
must hold whatever the load is checked (streams complete, nothing dropped, every table there).
The Letta peer is left out (its virtualenv is a minute of PyPI downloads that `make bench`
makes once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, "-m", "bench"]
STREAMS = 100


# About a minute alone; a busy CI machine may take several.
@pytest.mark.timeout(900)
def test_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # 100 streams for the tee and readers cells: the 1,000-stream cells would double the time
    # and check nothing more (the idle and live-tail scenarios keep their 1,000 readers).
    argv = [*BENCH, "--quick", "--no-letta", "--repeats", "1", "--levels", str(STREAMS)]
    proc = subprocess.Popen(
        [*argv, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        # SIGTERM: the bench stops every process it started (a kill would leave them running).
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    tables = (out / "tables.md").read_text()
    for section in (
        "### Tee overhead",
        "### A replay reader on every run",
        "### Opening runs",
        "### Saturation throughput",
        "### Sustained saturation",
        "### Write path",
        "### Replay",
        "### Idle readers",
        "### Targets",
    ):
        assert section in tables
    for level, row in summary["tee"]["summary"].items():
        for target in ("direct", "plain", "sidecar"):
            assert row[target]["incomplete"] == 0, (level, target)
        write = row["sidecar"]["write"]
        assert (write["stored"], write["dropped"]) == (write["expected"], 0), level
    readers = summary["readers"]["summary"][str(STREAMS)]["sidecar"]
    assert readers["incomplete"] == 0
    assert readers["write"]["dropped"] == 0
    # Every run got its reader; how many of them a loaded machine serves to the end (a reader
    # that comes after its run ended, before the writer stored it, gets 404) is a figure of the
    # table, not a check.
    assert readers["readers"] == STREAMS
    assert readers["readers_complete"] > 0
    runs = summary["runs"]["summary"]
    assert set(runs) == {"plain", "sidecar", "sidecar+reader"}
    for case, row in runs.items():
        assert row["complete"] == row["expected"], case
        assert row["cpu_ms_per_run"]["median"] > 0, case
        assert row["first_byte_p50_us"]["median"] > 0, case
    for workers in summary["scaling"]["summary"].values():
        assert (workers["incomplete"], workers["dropped"]) == (0, 0)
    assert summary["saturation"]["summary"]["sidecar:null"]["incomplete"] == 0
    # The long saturating cell: whatever it relayed, it stored (pacing, not overflow).
    sustained = summary["saturation"]["sustained"]["sidecar"]
    assert sustained["stored"] == sustained["expected_events"]
    assert sustained["write"]["dropped"] == 0
