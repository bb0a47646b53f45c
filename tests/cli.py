"""The real CLI (``python -m sidecar serve``) as a test's child process: on free loopback
ports, its output in a log file, awaited until its admin port answers. The replica tests
(``tests/functional/replicas.py``) and the fault suite (``tests/faults/harness.py``) build on it."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.functional.helpers import eventually
from tests.topologies import free_port


@dataclass
class CliSidecar:
    name: str
    proc: asyncio.subprocess.Process
    url: str
    admin_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def run_url(self, run_id: str, tail: str = "") -> str:
        return f"{self.url}/sidecar/v1/runs/{run_id}{tail}"


S = TypeVar("S", bound=CliSidecar)


async def start_cli(
    kind: type[S],
    name: str,
    *,
    upstream_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    workdir: Path,
    probe: str = "/readyz",
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    **flags: Any,
) -> S:
    """Start ``python -m sidecar serve`` with these flags (``drain_seconds=1`` for
    ``--drain-seconds 1``) and wait until ``probe`` on its admin port answers 200."""
    port, admin = free_port(), free_port()
    log = workdir / f"sidecar-{name}.log"
    args: dict[str, Any] = {
        "upstream-url": upstream_url,
        "redis-url": redis_url,
        "host": "127.0.0.1",
        "port": port,
        "admin-port": admin,
        "log-format": "text",
    }
    args.update({k.replace("_", "-"): v for k, v in flags.items()})
    argv = [part for k, v in args.items() for part in (f"--{k}", str(v))]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", *argv,
            stdout=out, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    sc = kind(name, proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)

    async def up() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"sidecar {name} exited early:\n{sc.output()}")
        try:
            async with http.get(sc.admin_url + probe) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    # A child process's port has no event to await.
    await eventually(up, timeout=timeout, interval=0.02, what=f"sidecar {name}'s {probe}")
    return sc
