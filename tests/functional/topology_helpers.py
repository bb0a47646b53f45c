"""Helpers for the tests on Redis Cluster and Sentinel: a run producer that writes like the
writer does (the real append script, one call per run, pipelined, idempotent retries)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sidecar.keys import Keys, RunId
from sidecar.store.runstore import APPEND_SCRIPT, APPEND_SHA

KEYS = Keys()


def stream_key(run: str) -> str:
    return KEYS.stream(RunId(run))


@dataclass
class Producer:
    """Appends events ``seq`` 1, 2, ... to runs, ``data = f"{run}:{seq}"`` (then ``pad`` bytes
    of filler), as the writer does; ``wake``: with the live tail's sharded pub/sub wake-up;
    ``sse``: the data as an SSE event (``id: <seq>``, ``data: <run>:<seq>``), for replays."""

    client: Redis | RedisCluster
    wake: bool = True
    pad: int = 0
    sse: bool = False
    acked: dict[str, int] = field(default_factory=dict)  # run -> last seq Redis confirmed
    replies: dict[str, int] = field(default_factory=dict)  # outcome -> count
    round_trips: int = 0
    # Told of what Redis confirmed, as the writer tells the live tail of its own runs
    # (``run, first new seq, last seq``).
    on_acked: Callable[[str, int, int], None] | None = None

    script = APPEND_SCRIPT
    sha = APPEND_SHA

    async def append(self, runs: list[str], n: int = 1) -> None:
        """Append the next ``n`` events of every run; retry until all are confirmed."""
        want = {run: self.acked.get(run, 0) + n for run in runs}
        backoff = 0.02
        while todo := [r for r in runs if self.acked.get(r, 0) < want[r]]:
            if await self.round(todo, want):
                backoff = 0.02
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def round(self, runs: list[str], want: dict[str, int]) -> bool:
        """One pipelined round trip; True if every run got to ``want``."""
        self.round_trips += 1
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for run in runs:
                    pipe.execute_command("EVALSHA", self.sha, 2, *self._args(run, want[run]))
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (redis_errors.RedisError, OSError) as exc:
            self._count(type(exc).__name__ + " (raised)")
            return False
        ok, noscript = True, False
        for run, reply in zip(runs, replies, strict=True):
            if isinstance(reply, Exception):
                self._count(type(reply).__name__)
                ok = False
                noscript |= isinstance(reply, redis_errors.NoScriptError)
                continue
            code = int(reply[0])
            self._count(f"code {code}")
            assert code == 0, f"append refused for {run}: {reply!r}"
            known, self.acked[run] = self.acked.get(run, 0), int(reply[3])
            if self.on_acked is not None and self.acked[run] > known:
                self.on_acked(run, known + 1, self.acked[run])
        if noscript:  # a promoted replica, or a restarted node: load it (on every primary)
            await self.client.script_load(self.script)
        return ok

    def _args(self, run: str, upto: int) -> list[Any]:
        known = self.acked.get(run, 0)
        args: list[Any] = [stream_key(run), stream_key(run) + ":meta"]
        wake = "1" if self.wake else "0"
        args += ["producer-1", "1" if known == 0 else "0", 30000, 600000, 100000, known, 0, wake, 0]
        for seq in range(known + 1, upto + 1):
            data = f"{run}:{seq}" + "x" * self.pad
            args += [seq, f"id: {seq}\ndata: {data}\n\n" if self.sse else data, 1, "false"]
        return args

    def _count(self, outcome: str) -> None:
        self.replies[outcome] = self.replies.get(outcome, 0) + 1


async def stored_seqs(client: Redis | RedisCluster, run: str) -> list[int]:
    entries: Any = await client.xrange(stream_key(run))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


@dataclass
class Traffic:
    """Writes and blocked reads through a set of clients while a test changes the topology.

    The writer appends ``n-0`` to stream ``s`` through the general client (optionally confirmed
    by ``WAIT 1``: acknowledged only once a replica has it); the reader follows ``s`` with
    ``XREAD BLOCK`` on the dedicated connection. Both record when things happened, and every
    error that reached them (after redis-py's own retries).
    """

    general: Redis
    blocker: Redis
    wait_replica: bool = False
    # Before each write, wait until no failover is under way (what the store does on Sentinel).
    gate: Callable[[float], Awaitable[bool]] | None = None
    acked: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, n)
    read: list[tuple[float, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    unconfirmed: int = 0  # writes WAIT did not see on a replica (retried)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    def _error(self, where: str, exc: BaseException) -> None:
        name = f"{where}: {type(exc).__name__}"
        self.errors[name] = self.errors.get(name, 0) + 1

    async def _write(self) -> None:
        n = 1
        while not self._stop.is_set():
            if self.gate is not None and not await self.gate(2.0):
                self._error("write", TimeoutError("failover pause"))
                continue
            try:
                async with self.general.pipeline(transaction=False) as pipe:
                    pipe.execute_command("XADD", "s", f"{n}-0", "n", n)
                    if self.wait_replica:
                        pipe.execute_command("WAIT", 1, 200)
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
            except (redis_errors.RedisError, OSError) as exc:
                self._error("write", exc)
                await asyncio.sleep(0.05)
                continue
            added = replies[0]
            if isinstance(added, Exception) and "equal or smaller" not in str(added):
                self._error("write", added)  # not "already written by a lost-reply attempt"
                await asyncio.sleep(0.05)
                continue
            if self.wait_replica and (isinstance(replies[1], Exception) or replies[1] < 1):
                self.unconfirmed += 1
                await asyncio.sleep(0.05)
                continue
            self.acked.append((time.monotonic(), n))
            n += 1
            await asyncio.sleep(0.01)

    async def _read(self) -> None:
        last = "0-0"
        while not self._stop.is_set():
            try:
                reply: Any = await self.blocker.xread({"s": last}, block=500)
            except (redis_errors.RedisError, OSError) as exc:
                self._error("read", exc)
                await asyncio.sleep(0.05)
                continue
            for _, entries in reply or ():
                for entry_id, _fields in entries:
                    self.read.append((time.monotonic(), int(entry_id.split(b"-")[0])))
                    last = entry_id

    def longest_write_pause(self) -> float:
        times = [t for t, _ in self.acked]
        return max(b - a for a, b in itertools.pairwise(times))

    def acked_after(self, moment: float) -> list[int]:
        return [n for t, n in self.acked if t > moment]
