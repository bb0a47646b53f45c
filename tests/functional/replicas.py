"""Real sidecar processes (``python -m sidecar serve``) for the process-level tests: started
concurrently, ready (``/readyz``) and subscribed to the cancel channel before a test uses them,
killed at the end of the test if still running."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port
from tests.functional.helpers import eventually

# How many processes are subscribed to the cancel channel (the test's view of Redis).
Subscribers = Callable[[], Awaitable[int]]


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    url: str
    admin_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def run_url(self, run_id: str, tail: str = "") -> str:
        return f"{self.url}/sidecar/v1/runs/{run_id}{tail}"

    async def metric(self, http: aiohttp.ClientSession, sample: str) -> float:
        """One sample of its /metrics, e.g. ``sse_sidecar_forced_done_total{reason="x"}``."""
        async with http.get(self.admin_url + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0


class Replicas:
    def __init__(self, http: aiohttp.ClientSession, upstream_url: str, workdir: Path) -> None:
        self._http = http
        self._upstream_url = upstream_url
        self._workdir = workdir
        self.started: list[Replica] = []

    async def start(
        self, redis_url: str, subscribers: Subscribers, **configs: dict[str, Any]
    ) -> list[Replica]:
        """``await start(url, subscribers, a={flags}, b={flags})``, in that order."""
        before = len(self.started)
        out = await asyncio.gather(
            *(self._start_one(name, redis_url, flags) for name, flags in configs.items())
        )

        async def subscribed() -> bool:
            return await subscribers() == before + len(out)

        # No event tells when a child process's pub/sub subscription is in place.
        await eventually(subscribed, timeout=10, what="every replica to subscribe to cancels")
        return list(out)

    async def _start_one(self, name: str, redis_url: str, flags: dict[str, Any]) -> Replica:
        port, admin = free_port(), free_port()
        log = self._workdir / f"sidecar-{name}.log"
        args = {
            "upstream-url": self._upstream_url,
            "redis-url": redis_url,
            "host": "127.0.0.1",
            "port": port,
            "admin-port": admin,
            "drain-seconds": 1,
            "log-format": "text",
        }
        args.update({k.replace("_", "-"): v for k, v in flags.items()})
        argv = [part for k, v in args.items() for part in (f"--{k}", str(v))]
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "serve", *argv,
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        replica = Replica(name, proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)
        self.started.append(replica)

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"sidecar {name} exited early:\n{replica.output()}")
            try:
                async with self._http.get(replica.admin_url + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, timeout=20, interval=0.02, what=f"sidecar {name}'s /readyz")
        return replica

    async def close(self) -> None:
        for replica in self.started:
            if replica.proc.returncode is None:
                replica.proc.kill()
                await replica.proc.wait()
