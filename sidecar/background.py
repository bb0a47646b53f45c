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
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)

RESTART_START = 0.1
RESTART_MAX = 30.0

# The test hook (README, "Faults: what happens, measured"): when this variable names tasks
# (comma-separated), each SIGUSR1 makes those tasks fail where they are, as if their body had
# raised there, so the crash path (log, count, restart) runs for real in a process. Unset (as in
# any deployment), nothing is installed.
TEST_CRASH_ENV = "SIDECAR_TEST_CRASH"


class InjectedCrash(RuntimeError):
    """What a task named in ``SIDECAR_TEST_CRASH`` fails with on SIGUSR1."""


_crashable: dict[str, Background] = {}


def _crash_named() -> None:
    for background in list(_crashable.values()):
        background.crash()


def _register_for_test_crashes(background: Background) -> None:
    names = {n.strip() for n in os.environ.get(TEST_CRASH_ENV, "").split(",") if n.strip()}
    if background.name not in names:
        return
    if not _crashable:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _crash_named)
    _crashable[background.name] = background


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
        self._in_body = False
        self._crash_requested = False
        self._crash_cancels = 0
        self.crashes = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=self.name)
            _register_for_test_crashes(self)

    def crash(self) -> None:
        """Make the body fail now, wherever it waits (the test hook)."""
        if self._task is not None and self._in_body and not self._crash_requested:
            self._crash_requested = True
            self._deliver_crash()

    def _deliver_crash(self) -> None:
        # A library may swallow a cancellation (asyncio.wait_for on Python 3.11 does when its
        # future completes at the same time, as in redis-py's socket writes): deliver it again
        # until the body has failed.
        if self._crash_requested and self._task is not None and self._in_body:
            self._task.cancel()
            self._crash_cancels += 1
            asyncio.get_running_loop().call_later(0.05, self._deliver_crash)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        delay = RESTART_START
        while True:
            self._in_body = True
            try:
                await self._body()
                return
            except asyncio.CancelledError:
                if not self._crash_requested:
                    raise
                self._crash_requested = False
                task = asyncio.current_task()
                assert task is not None
                while self._crash_cancels:
                    self._crash_cancels -= 1
                    task.uncancel()
                failure: BaseException = InjectedCrash(f"{TEST_CRASH_ENV}: SIGUSR1")
            except Exception as exc:
                failure = exc
            finally:
                self._in_body = False
            self.crashes += 1
            if self._m is not None:
                self._m.background_crashes.labels(self.name).inc()
            log.error(
                "background task %s crashed (%d so far); restarting it in %.1fs",
                self.name,
                self.crashes,
                delay,
                exc_info=failure,
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
