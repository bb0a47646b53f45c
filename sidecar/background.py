"""A named, supervised background task that a component starts once and stops at shutdown.

A crash is never silent and never fatal: it is logged with its traceback, counted in
``sse_sidecar_background_crashes_total{task}``, and the body is started again after a backoff
(an endless loop that raises once must not leave the writer or the follower dead until the
next restart, nor surface only at shutdown). ``stop`` cancels and waits within a deadline and
never raises, so one component's failure cannot skip another's cleanup.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)

RESTART_START = 0.1
RESTART_MAX = 30.0


class Background:
    def __init__(
        self,
        name: str,
        body: Callable[[], Coroutine[Any, Any, None]],
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._m = metrics
        self._task: asyncio.Task[None] | None = None
        self.crashes = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        delay = RESTART_START
        while True:
            try:
                await self._body()
                return
            except Exception:
                self.crashes += 1
                if self._m is not None:
                    self._m.background_crashes.labels(self.name).inc()
                log.exception(
                    "background task %s crashed (%d so far); restarting it in %.1fs",
                    self.name,
                    self.crashes,
                    delay,
                    extra={"task": self.name},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX)

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel the task and wait for it, for at most ``timeout`` seconds: a library that
        swallows a cancellation must not hold up shutdown."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.warning("background task %s did not stop within %.1fs", self.name, timeout)
            return
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s ended with %r", self.name, exc)
