"""``sse-sidecar quickstart --once`` end to end: real Redis, demo upstream and sidecar processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.topologies import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server on PATH"
)

# run (<dialect>:<scenario>) -> (status, stop_reason, forced_done as the summary prints it)
EXPECTED = {
    "letta:normal": ("completed", "end_turn", "-"),
    "letta:error_then_done": ("failed", "llm_api_error", "-"),
    "letta:dies": ("failed", "error", "stream_incomplete"),
    "openai-chat:dies": ("failed", "-", "stream_incomplete"),
    "openai-responses:normal": ("completed", "completed", "-"),
    "anthropic:error_then_done": ("failed", "-", "-"),
    "generic:normal": ("completed", "-", "-"),
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (the tests' own picker: distinct, and outside the
    ephemeral range)."""
    return [free_port() for _ in range(n)]


def test_quickstart_once(tmp_path: Path) -> None:
    redis_port, upstream_port, port, admin_port = free_ports(4)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sidecar", "quickstart", "--once",
            "--redis-port", str(redis_port),
            "--upstream-port", str(upstream_port),
            "--port", str(port),
            "--admin-port", str(admin_port),
            "--workdir", str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output

    rows = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in EXPECTED and len(cells) == 8:
            rows[cells[0]] = cells
    assert set(rows) == set(EXPECTED), output
    for scenario, (status, stop_reason, forced) in EXPECTED.items():
        _, run_id, client, stored, got_status, got_stop, got_forced, key = rows[scenario]
        assert (got_status, got_stop, got_forced) == (status, stop_reason, forced), output
        assert run_id.startswith("run-"), output
        assert key == f"sse:run:{{{run_id}}}", output
        assert int(client) == int(stored) > 0, output
    lines = proc.stdout.splitlines()
    counted = [line for line in lines if "sse_sidecar_forced_done_total{" in line]
    assert counted == [
        '  sse_sidecar_forced_done_total{dialect="letta",reason="stream_incomplete"} 1.0',
        '  sse_sidecar_forced_done_total{dialect="openai-chat",reason="stream_incomplete"} 1.0',
    ], output
    assert 'sse_sidecar_stream_transitions_total{transition="saw_done_after_error"} 2.0' in (
        proc.stdout
    )
    assert "OK: every run ended as DESIGN.md says it must." in proc.stdout
    assert (workdir / "redis.log").exists()
    assert (workdir / "sidecar.log").exists()
