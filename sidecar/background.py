"""A named background task that a component starts once and stops (cancels and awaits)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class Background:
    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._body = body
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._body(), name=self._name)

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel the task and wait for it, for at most ``timeout`` seconds: a library that
        swallows a cancellation must not hold up shutdown."""
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if done:
                with contextlib.suppress(asyncio.CancelledError):
                    self._task.result()
            self._task = None
