"""What the figures were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _hypervisor() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Hypervisor vendor:"):
            return line.split(":", 1)[1].strip()
    return None


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def describe(redis_version: str, letta_version: str | None) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "hypervisor": _hypervisor(),
        "memory_gib": _mem_gib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "redis": redis_version,
        "packages": {
            name: _version(name)
            for name in ("sse-sidecar", "aiohttp", "redis", "hiredis", "orjson", "uvloop")
        },
        "letta": letta_version,
        "loadavg_start": os.getloadavg(),
    }


def one_line(m: dict[str, Any]) -> str:
    hv = f", {m['hypervisor']} VM" if m.get("hypervisor") else ""
    return (
        f"{m['cpu']}, {m['cores']} cores{hv}, {m['memory_gib']} GiB; Linux {m['kernel']}; "
        f"Python {m['python']}; Redis {m['redis']}; aiohttp {m['packages']['aiohttp']}, "
        f"redis-py {m['packages']['redis']} (hiredis {m['packages']['hiredis']})"
        + (f"; letta {m['letta']}" if m.get("letta") else "")
    )
