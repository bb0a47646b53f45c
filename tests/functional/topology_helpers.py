"""Helpers for the tests on Redis Cluster and Sentinel: a run producer that writes like the
writer does (the real append script, one call per run, pipelined, idempotent retries)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sidecar.keys import Keys, RunId
from sidecar.writer import APPEND_SCRIPT

KEYS = Keys()
_RETURN = "return {0, added, trimmed, last}"
# The append script with the live tail's wake-up (cluster_tail.py): the change the store would
# make to append.lua. The channel has the run's hash tag, so the script stays slot-local.
TAIL_APPEND_SCRIPT = APPEND_SCRIPT.replace(
    _RETURN,
    "if added > 0 then\n  redis.call('SPUBLISH', KEYS[1] .. ':tail', last)\nend\n" + _RETURN,
)
assert TAIL_APPEND_SCRIPT != APPEND_SCRIPT


def stream_key(run: str) -> str:
    return KEYS.stream(RunId(run))


@dataclass
class Producer:
    """Appends events ``seq`` 1, 2, ... to runs, ``data = f"{run}:{seq}"``, as the writer does."""

    client: Redis | RedisCluster
    script: str = TAIL_APPEND_SCRIPT
    acked: dict[str, int] = field(default_factory=dict)  # run -> last seq Redis confirmed
    replies: dict[str, int] = field(default_factory=dict)  # outcome -> count
    round_trips: int = 0

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.script.encode()).hexdigest()

    async def append(self, runs: list[str], n: int = 1) -> None:
        """Append the next ``n`` events of every run; retry until all are confirmed."""
        want = {run: self.acked.get(run, 0) + n for run in runs}
        backoff = 0.02
        while todo := [r for r in runs if self.acked.get(r, 0) < want[r]]:
            if await self._round(todo, want):
                backoff = 0.02
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _round(self, runs: list[str], want: dict[str, int]) -> bool:
        self.round_trips += 1
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for run in runs:
                    pipe.execute_command("EVALSHA", self.sha, 2, *self._args(run, want[run]))
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (redis_errors.RedisError, OSError) as exc:
            self._count(type(exc).__name__ + " (raised)")
            return False
        ok = True
        for run, reply in zip(runs, replies, strict=True):
            if isinstance(reply, Exception):
                self._count(type(reply).__name__)
                ok = False
                if isinstance(reply, redis_errors.NoScriptError):
                    await self.client.script_load(self.script)
                continue
            code = int(reply[0])
            self._count(f"code {code}")
            assert code == 0, f"append refused for {run}: {reply!r}"
            self.acked[run] = int(reply[3])
        return ok

    def _args(self, run: str, upto: int) -> list[Any]:
        known = self.acked.get(run, 0)
        args: list[Any] = [stream_key(run), stream_key(run) + ":meta"]
        args += ["producer-1", "1" if known == 0 else "0", 30000, 600000, 100000, known, 0]
        for seq in range(known + 1, upto + 1):
            args += [seq, f"{run}:{seq}", 1, "false"]
        return args

    def _count(self, outcome: str) -> None:
        self.replies[outcome] = self.replies.get(outcome, 0) + 1


async def stored_seqs(client: Redis | RedisCluster, run: str) -> list[int]:
    entries: Any = await client.xrange(stream_key(run))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]
