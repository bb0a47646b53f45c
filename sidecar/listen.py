"""The traffic port's listening sockets: many connections accepted per wake-up, on any loop.

libuv (and so uvloop, the default loop) accepts one connection per turn of the loop since
libuv 1.45 (its PR 3696): with a thousand streams keeping the loop busy, a turn takes tens of
milliseconds, and a thousand clients connecting at once waited 16 s for their turn in the
bench (``all open after``) instead of 4 s on the standard library's loop, which accepts up to
its backlog per wake-up. This site watches its listening sockets itself and accepts every
connection that is waiting (up to ``ACCEPT_BATCH``), then hands each to the loop as an accepted
socket, with aiohttp's protocol, exactly as ``TCPSite``'s server would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

ACCEPT_BATCH = 256  # connections accepted per wake-up at most; the rest wait for the next
# Out of file descriptors or memory: accepting again at once would spin (asyncio's loop does
# the same).
ACCEPT_RETRY_SECONDS = 1.0
_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def listening_sockets(
    host: str, port: int, *, backlog: int, reuse_port: bool
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to (as
    ``loop.create_server`` binds them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As create_server: an IPv6 socket does not also take the IPv4 addresses.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class BatchAcceptSite(web.BaseSite):
    """A ``TCPSite`` that accepts every waiting connection per wake-up (see the module)."""

    __slots__ = ("_host", "_loop", "_pending", "_port", "_reuse_port", "_sockets")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, backlog: int, reuse_port: bool
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._sockets: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Hand-overs under way, referenced until done (the loop holds tasks only weakly).
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self.port}"

    @property
    def port(self) -> int:
        if self._sockets:
            return int(self._sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        self._loop = loop = asyncio.get_running_loop()
        self._sockets = listening_sockets(
            self._host, self._port, backlog=self._backlog, reuse_port=self._reuse_port
        )
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    async def stop(self) -> None:
        self._runner._check_site(self)
        # A hand-over under way is left to finish: its connection is the runner's to close
        # (cancelled midway, the socket would be nobody's).
        self._close_sockets()
        self._runner._unreg_site(self)

    def _close_sockets(self) -> None:
        loop = self._loop
        for sock in self._sockets:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    def _accept(self, sock: socket.socket) -> None:
        loop = self._loop
        factory = self._runner.server
        if loop is None or factory is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.error(
                    "cannot accept connections (%s): trying again in %gs",
                    exc.strerror,
                    ACCEPT_RETRY_SECONDS,
                )
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, sock)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(loop.connect_accepted_socket(factory, conn))
            self._pending.add(task)
            task.add_done_callback(self._handed_over)

    def _handed_over(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("an accepted connection could not be set up: %s", exc)

    def _resume(self, sock: socket.socket) -> None:
        if self._loop is not None and sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
