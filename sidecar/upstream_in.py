"""The upstream's body, handed to the tee on the HTTP parser's own call.

aiohttp hands a response body out through its ``StreamReader``: for each piece of the body its
HTTP parser calls ``feed_data``, which appends the piece to a buffer and resolves the reading
task's future; the task then takes a step (``readany``, the async iterator) to take the piece
back out. For a tee that is a future, a task step and a buffer round trip per upstream chunk,
and at 20-100 tokens/s per stream nearly every event comes in a chunk of its own.

So, while a run's body is read as it comes (identity coding: no decompression step that must
give the loop a turn between pieces), the tee reads it directly: the response's reader is
switched to ``DirectReader``, whose ``feed_data`` collects the pieces the parser hands over and
gives them to the tee as one, right after the parser is done with the socket read that brought
them (one ``call_soon`` per read); its ``feed_eof`` and ``set_exception`` end the read. The
tee's task only waits for that end. At most one socket read's pieces wait meanwhile, so
aiohttp's flow control never pauses the connection: the tee consumes the body as fast as the
loop reads the socket.

The switch is an assignment of ``__class__`` (``DirectReader`` adds methods, no state, so the
layout is the same) and is undone once the read ends, so that whatever the upstream sends after
its terminal is buffered and read as aiohttp reads it. It relies on the parser calling the
reader's methods by name (both aiohttp parsers do); ``tests/functional/test_upstream_in.py`` pins
that against the installed aiohttp. Any reader that is not a plain ``StreamReader`` in a clean
state (an error or the end already in it) is read the usual way by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

import aiohttp

End = TypeVar("End")
# Asked before pieces go to the tee: True holds them, until the gate calls the resume callback
# it was given (the pacer, sidecar/pace.py, holds a read this way while it pauses the
# connection, so what was read already waits too instead of being relayed).
Gate = Callable[[Callable[[], None]], bool]
# With a gate, pieces go to the tee in slices of at most this, the gate asked before each.
GATED_SLICE = 64 << 10

# id(reader) -> its read. StreamReader has __slots__ and no room for a reference to the read;
# DirectReader may add none (``__class__`` assignment needs the same layout).
_READS: dict[int, _DirectRead[object]] = {}


class _DirectRead(Generic[End]):
    __slots__ = ("done", "ended", "eof", "gate", "held", "loop", "pending", "reader", "take")

    def __init__(
        self,
        reader: aiohttp.StreamReader,
        take: Callable[[bytes], End | None],
        done: asyncio.Future[End | None],
        gate: Gate | None,
    ) -> None:
        self.reader = reader
        self.take = take
        self.done = done
        self.gate = gate
        self.loop = done.get_loop()
        self.pending: list[bytes] = []
        self.ended = False
        self.held = False  # the gate holds the pieces until it calls resume
        self.eof = False  # the body has ended: once the pending pieces are taken, so has the read

    def piece(self, data: bytes) -> None:
        # Handed over once the parser is done with what the socket read brought: a read of
        # several HTTP chunks (a loop turn behind, under load) is one piece for the tee, so one
        # client write. Handing each chunk over at once cost more than it saved at 1,000
        # streams (102 vs 93 CPU µs per event, an interleaved bench run).
        self.pending.append(data)
        if len(self.pending) == 1:
            self.loop.call_soon(self.flush)

    def flush(self, force: bool = False) -> None:
        """Hand the pending pieces to the tee, unless the gate holds them (``force``: the body
        ends or breaks here, so they go now whatever the gate says). With a gate, in slices of
        ``GATED_SLICE`` bytes, the gate asked before each: a socket read or a buffer can hold
        hundreds of KB, and a hold must stop what was read already, not only what is not."""
        if self.ended or not self.pending or (self.held and not force):
            return
        data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending.clear()
        gate = None if force else self.gate
        while gate is not None:
            if gate(self.resume):
                self.pending.append(data)
                self.held = True
                return
            if len(data) <= GATED_SLICE:
                break
            head, data = data[:GATED_SLICE], data[GATED_SLICE:]
            if self._give(head):
                return
        if not self._give(data) and self.eof:
            self.finish(None)

    def _give(self, data: bytes) -> bool:
        """One piece to the tee; True when the read is over (the tee's end, or its failure)."""
        try:
            end = self.take(data)
        except Exception as exc:  # a bug in the tee: its task fails, not aiohttp's parser
            self.finish(exc)
            return True
        if end is not None:
            self.finish(end)
            return True
        return False

    def resume(self) -> None:
        """The gate lets the pieces go (it has the connection read again)."""
        self.held = False
        if self.pending and not self.ended:
            self.loop.call_soon(self.flush)

    def finish(self, end: End | BaseException | None) -> None:
        """The read is over: ``end`` is what it returns (an exception: what it raises)."""
        self.end()
        if self.done.done():
            return
        if isinstance(end, BaseException):
            self.done.set_exception(end)
        else:
            self.done.set_result(end)

    def end(self) -> None:
        """No more pieces for the tee: the reader is aiohttp's own again."""
        self.ended = True
        _READS.pop(id(self.reader), None)
        self.reader.__class__ = aiohttp.StreamReader


# The base's methods are called through the class, not super(): the read may end (and switch
# the reader back to the base class) inside one of these methods, and super() would then
# refuse an object no longer of its class, raising into aiohttp's parser.
_BASE = aiohttp.StreamReader


class DirectReader(aiohttp.StreamReader):
    """A ``StreamReader`` whose pieces go to the tee, not into its buffer."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        read = _READS.get(id(self))
        if read is None:  # not reached: the class is switched back with the registration
            return _BASE.feed_data(self, data, size)
        if data:
            read.piece(data)
        # False: nothing held back for the parser to feed again (aiohttp's own contract).
        return False

    def end_http_chunk_receiving(self) -> None:
        # The base records where each HTTP chunk ended, for readchunk(); nothing reads that
        # from a direct read.
        pass

    def feed_eof(self) -> None:
        read = _READS.get(id(self))
        if read is not None:
            read.flush(force=True)  # the body's last pieces go first
        _BASE.feed_eof(self)
        if read is not None:
            read.finish(None)

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        read = _READS.get(id(self))
        if read is not None:
            # What came before the connection broke: events the upstream did send.
            read.flush(force=True)
        if exc_cause is None:
            _BASE.set_exception(self, exc)
        else:
            _BASE.set_exception(self, exc, exc_cause)
        if read is not None:
            read.finish(exc)


def readable_directly(reader: aiohttp.StreamReader) -> bool:
    """Whether ``read_directly`` can take ``reader`` over (a plain reader, no error in it)."""
    return type(reader) is aiohttp.StreamReader and reader.exception() is None


async def read_directly(
    reader: aiohttp.StreamReader,
    take: Callable[[bytes], End | None],
    gate: Gate | None = None,
) -> End | None:
    """Give ``take`` every piece of the body, in order, until it returns an end (returned
    here) or the body ends (None). The connection's failure is raised as aiohttp raised it to a
    reader (``aiohttp.ClientPayloadError`` and the like). The caller checked
    ``readable_directly``. ``gate``: see ``Gate`` (the body's end or failure does not wait for
    it).

    What the reader holds already goes first; from then on the pieces come on the parser's
    call. Cancelling the wait hands the reader back to aiohttp (the caller closes the response).
    """
    # read_nowait may let the parser feed more as it drains (aiohttp resumes reading below its
    # low-water mark, and parses what it held back): read until nothing is left, with no await
    # in between, before the reader is switched (what the parser feeds meanwhile lands behind
    # what was buffered, in order).
    buffered: list[bytes] = []
    while piece := reader.read_nowait():
        buffered.append(piece)
    if reader.is_eof() and not buffered:
        return None
    loop = asyncio.get_running_loop()
    done: asyncio.Future[End | None] = loop.create_future()
    read = _DirectRead(reader, take, done, gate)
    # Through the gate like every later piece (a new run's buffered bytes can be a few hundred
    # KB: 40 MB of them passed a hold of 100 streams before they went this way).
    read.pending = buffered
    if reader.is_eof():
        read.eof = True  # the whole rest of the body: the read ends once it is taken
    else:
        _READS[id(reader)] = read  # type: ignore[assignment]
        reader.__class__ = DirectReader
    if buffered:
        loop.call_soon(read.flush)
    try:
        return await done
    finally:
        read.end()
