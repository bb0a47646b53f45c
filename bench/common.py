"""Pieces shared by every bench process; standard library only.

The load generator, the upstream and the Letta peer run in other interpreters (the Letta peer in
its own virtualenv), so nothing here may import a third-party package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The upstream embeds its send time in every token event as "t":<microseconds since the epoch>.
# (Microseconds: 16 digits. A 19-digit nanosecond stamp would put every event on the sidecar's
# big-integer JSON path, which real payloads do not take.)
T_FIELD = re.compile(rb'"t":(\d+)')


# -- statistics --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, by linear interpolation."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(sorted_values[lo])
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean and the sample count of a latency sample."""
    data = sorted(values)
    if not data:
        return {"n": 0}
    return {
        "n": len(data),
        "p50": percentile(data, 0.50),
        "p90": percentile(data, 0.90),
        "p99": percentile(data, 0.99),
        "p999": percentile(data, 0.999),
        "max": float(data[-1]),
        "mean": sum(data) / len(data),
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of one figure over repeated runs (NaNs left out)."""
    clean = sorted(v for v in values if v is not None and not math.isnan(v))
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": list(values)}
    return {
        "median": percentile(clean, 0.5),
        "min": clean[0],
        "max": clean[-1],
        "runs": list(values),
    }


# -- processes ---------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name is in parentheses and may contain spaces: split after its closing one.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants (a supervisor and its workers)."""
    total = proc_cpu_seconds(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += tree_cpu_seconds(child)
    return total


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile() -> None:
    """1,000 streams need a few thousand sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the token events ----------------------------------------------------------------------------

WORDS = (
    b"Server-sent events carry an answer to the client one token at a time and a sidecar keeps "
    b"a copy of every event so nothing is lost when the client drops"
).split()


def now_us() -> int:
    return time.time_ns() // 1000


def token_event(message_id: bytes, word: bytes, t_us: int, ids: bytes) -> bytes:
    """One ~150-byte Letta-style assistant_message chunk, send time embedded as "t"."""
    return (
        b'data: {"id":"message-%s","message_type":"assistant_message",'
        b'"content":"%s ",%s,"t":%d}\n\n'
        % (
            message_id,
            word,
            ids,
            t_us,
        )
    )


NULL_IDS = b'"seq_id":null,"run_id":null'
STOP_EVENT = b'data: {"message_type":"stop_reason","stop_reason":"end_turn"}\n\n'
DONE_EVENT = b"data: [DONE]\n\n"


# -- HTTP/1.1 chunked bodies ---------------------------------------------------------------------


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder; ``done`` once the last chunk came."""

    __slots__ = ("_buf", "_need", "done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = -1  # payload bytes (plus CRLF) still expected for the current chunk
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        n = len(buf)
        while not self.done:
            if self._need < 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.done = True
                    break
                self._need = size
            if n - pos < self._need + 2:
                break
            out += buf[pos : pos + self._need]
            pos += self._need + 2
            self._need = -1
        del buf[:pos]
        return bytes(out)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.1 response head (without CRLFCRLF)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


# -- the line-JSON command protocol of the bench workers -----------------------------------------

Handler = Callable[..., Awaitable[dict[str, Any]]]


async def serve_commands(handlers: dict[str, Handler], out: TextIO) -> None:
    """Read one JSON command per stdin line, answer one JSON line on stdout, until EOF.

    A command is ``{"op": name, ...arguments}``; the answer ``{"ok": true, "result": {...}}`` or
    ``{"ok": false, "error": "..."}``. Commands run one at a time; what a command started (open
    readers, say) keeps running in the loop between commands.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(
        json.dumps({"ok": True, "result": {"ready": True, "pid": os.getpid()}}),
        file=out,
        flush=True,
    )
    while line := await reader.readline():
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        try:
            result = await handlers[op](**command)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), file=out, flush=True)


def protocol_stdout() -> TextIO:
    """The real stdout, for replies only; fd 1 and sys.stdout become stderr, so that nothing a
    library prints (Letta logs to stdout) can corrupt the protocol."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def run_worker(handlers: dict[str, Handler], out: TextIO | None = None) -> None:
    raise_nofile()
    asyncio.run(serve_commands(handlers, out if out is not None else protocol_stdout()))


@dataclass(slots=True)
class Clock:
    """Wall time and own CPU time of a measured section."""

    wall0: float = 0.0
    cpu0: float = 0.0

    def start(self) -> Clock:
        self.wall0 = time.perf_counter()
        self.cpu0 = self_cpu_seconds()
        return self

    def elapsed(self) -> dict[str, float]:
        return {
            "wall_s": time.perf_counter() - self.wall0,
            "cpu_s": self_cpu_seconds() - self.cpu0,
        }
