"""A loopback TCP forwarder that puts network faults between the sidecars and Redis.

The sidecars connect to ``forwarder.port``; every connection is relayed to ``target``. The mode
decides what the network does, for the connections already open and for new ones:

- ``pass``: bytes flow both ways (each chunk after ``delay`` seconds when one is set, in order).
- ``blackhole``: connections are accepted and held; no byte moves either way, as in a partition
  where packets vanish. What was sent meanwhile is delivered when the mode goes back to
  ``pass`` (TCP would retransmit it), unless ``reset`` cut the connection first.
- ``reset()``: every open connection is aborted with a TCP RST on both sides (a failover, a
  dead load balancer); new connections are accepted again in the current mode.
- ``retarget(port)``: new connections go to another Redis (with ``reset``: a failover).

The fault cases run it as a process of its own (``ForwarderProcess``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Mode(Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


CHUNK = 1 << 16


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer sees ``connection reset``."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Forwarder:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        self.accepted = 0
        self.resets = 0
        self.relayed = 0  # bytes delivered, both ways
        self._mode = Mode.PASS
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in self._handlers:
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        if self._server is not None:
            await self._server.wait_closed()

    def set_mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode is Mode.PASS:
            self._flowing.set()
        else:
            self._flowing.clear()

    def blackhole(self) -> None:
        self.set_mode(Mode.BLACKHOLE)

    def pass_(self) -> None:
        self.set_mode(Mode.PASS)

    def retarget(self, port: int) -> None:
        """New connections go to this port (a failover: the old ones are left to ``reset``)."""
        self.target = (self.target[0], port)

    def reset(self) -> int:
        """Abort every open connection with an RST on both sides; how many there were."""
        links, self._links = self._links, set()
        for link in links:
            _abort(link.client)
            if link.server is not None:
                _abort(link.server)
            for task in link.tasks:
                task.cancel()
        self.resets += len(links)
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        link = _Link(writer)
        self._links.add(link)
        try:
            # Held here while blackholed: the client's connect succeeded, its commands hang.
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, asyncio.CancelledError):
            self._drop(link)
            return
        if link not in self._links:  # reset while connecting
            _abort(up_writer)
            return
        link.server = up_writer
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]
        # Kept open until both directions end (a returning handler may close its streams).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*link.tasks, return_exceptions=True)

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            link.client.close()
            if link.server is not None:
                link.server.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Relay one direction; chunks keep their order, each delayed by ``delay`` seconds. An
        end of stream on either side closes the whole connection (Redis needs no half-close)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst, link))
        try:
            while chunk := await src.read(CHUNK):
                queue.put_nowait((time.monotonic() + self.delay, chunk))
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            self._drop(link)

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                due, chunk = await queue.get()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if not chunk:
                    return
                self.relayed += len(chunk)
                dst.write(chunk)
                await dst.drain()
        except OSError:
            self._drop(link)  # the reading side then ends too


class ForwarderProcess:
    """The forwarder in a process of its own (``python -m tests.faults.forwarder PORT``), driven
    over its stdin: the test process's own load (upstreams, clients, readers) then does not slow
    the sidecars' Redis traffic. It exits when its stdin closes, so it never outlives a test."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.faults.forwarder", str(self.target_port),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.port = int((await self._reply())["port"])

    async def _reply(self) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 10)
        assert line, "the forwarder process exited"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def command(self, *words: object) -> dict[str, Any]:
        """Send one command; the forwarder's counters after it."""
        async with self._lock:
            assert self._proc is not None
            assert self._proc.stdin is not None
            self._proc.stdin.write(" ".join(map(str, words)).encode() + b"\n")
            await self._proc.stdin.drain()
            return await self._reply()

    async def blackhole(self) -> None:
        await self.command("blackhole")

    async def pass_(self) -> None:
        await self.command("pass")

    async def reset(self) -> int:
        return int((await self.command("reset"))["reset"])

    async def retarget(self, port: int) -> None:
        await self.command("retarget", port)

    async def set_delay(self, seconds: float) -> None:
        await self.command("delay", seconds)

    async def stats(self) -> dict[str, Any]:
        return await self.command("stats")

    async def aclose(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


async def _serve(target_port: int) -> None:
    """The forwarder process: one JSON line with its port, then one per command on stdin."""
    fwd = Forwarder(target_port)
    await fwd.start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def say(**extra: Any) -> None:
        sys.stdout.write(json.dumps(extra) + "\n")
        sys.stdout.flush()

    say(port=fwd.port)
    while line := await stdin.readline():
        command, *args = line.decode().split()
        reset = 0
        if command == "blackhole":
            fwd.blackhole()
        elif command == "pass":
            fwd.pass_()
        elif command == "reset":
            reset = fwd.reset()
        elif command == "retarget":
            fwd.retarget(int(args[0]))
        elif command == "delay":
            fwd.delay = float(args[0])
        elif command != "stats":
            raise SystemExit(f"unknown forwarder command {command!r}")
        say(
            reset=reset,
            mode=fwd.mode.value,
            accepted=fwd.accepted,
            relayed=fwd.relayed,
            resets=fwd.resets,
            open=fwd.open_connections,
        )
    await fwd.aclose()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_serve(int(sys.argv[1])))
