"""Real sidecar processes (``python -m sidecar serve``) for the process-level tests: started
concurrently, ready (``/readyz``) and subscribed to the cancel channel before a test uses them,
killed at the end of the test if still running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.cli import CliSidecar, start_cli
from tests.functional.helpers import eventually

# How many processes are subscribed to the cancel channel (the test's view of Redis).
Subscribers = Callable[[], Awaitable[int]]


class Replica(CliSidecar):
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
        replica = await start_cli(
            Replica,
            name,
            upstream_url=self._upstream_url,
            redis_url=redis_url,
            http=self._http,
            workdir=self._workdir,
            timeout=20,
            **{"drain_seconds": 1, **flags},
        )
        self.started.append(replica)
        return replica

    async def close(self) -> None:
        for replica in self.started:
            if replica.proc.returncode is None:
                replica.proc.kill()
                await replica.proc.wait()
