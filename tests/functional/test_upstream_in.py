"""The tee's direct read of an upstream body (sidecar/upstream_in.py), against a real aiohttp
server and client: these tests pin the installed aiohttp's parser to the reader's methods the
direct read overrides (a parser that stopped calling them would leave the pieces buffered, and
every test here would time out)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sidecar.upstream_in import DirectReader, read_directly, readable_directly
from tests.conftest import RESET, Gate, Step, Upstream
from tests.functional.helpers import eventually

TIMEOUT = 5.0


class Taken:
    """What the tee was given, piece by piece, and the reader's class at each call."""

    def __init__(self, resp: aiohttp.ClientResponse, end_at: bytes | None = None) -> None:
        self.resp = resp
        self.pieces: list[bytes] = []
        self.kinds: list[type] = []
        self.end_at = end_at
        self.arrived = asyncio.Event()

    def __call__(self, piece: bytes) -> str | None:
        self.pieces.append(piece)
        self.kinds.append(type(self.resp.content))
        self.arrived.set()
        return "ended" if self.end_at is not None and self.end_at in piece else None

    async def next(self) -> None:
        await asyncio.wait_for(self.arrived.wait(), TIMEOUT)
        self.arrived.clear()


async def _paced(
    upstream: Upstream, http: aiohttp.ClientSession, steps: list[Step]
) -> aiohttp.ClientResponse:
    """A response whose pieces the test releases one by one (a gate before each)."""
    upstream.sse("/s", steps)
    resp = await http.get(upstream.url + "/s")
    assert readable_directly(resp.content)
    return resp


async def test_every_piece_reaches_the_tee_in_order_on_the_parsers_call(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gates = [Gate() for _ in range(3)]
    pieces = [b"data: one\n\n", b"data: two\n", b"\ndata: three\n\n"]
    steps: list[Step] = [s for g, p in zip(gates, pieces, strict=True) for s in (g, p)]
    resp = await _paced(upstream, http, steps)
    taken = Taken(resp)
    read = asyncio.create_task(read_directly(resp.content, taken))
    for gate in gates:
        await asyncio.wait_for(gate.reached.wait(), TIMEOUT)
        gate.open()
        await taken.next()
    assert await asyncio.wait_for(read, TIMEOUT) is None  # the body ended
    assert taken.pieces == pieces
    # Each came on the parser's own call, not through aiohttp's buffer.
    assert taken.kinds == [DirectReader] * 3
    assert type(resp.content) is aiohttp.StreamReader
    assert resp.content.at_eof()


async def test_what_the_reader_holds_already_goes_first(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    resp = await _paced(upstream, http, [b"data: early\n\n", b"data: more\n\n", gate, b"late"])
    await asyncio.wait_for(gate.reached.wait(), TIMEOUT)

    async def buffered() -> bool:
        return resp.content.total_bytes == len(b"data: early\n\ndata: more\n\n")

    await eventually(buffered, what="both pieces in aiohttp's buffer")
    taken = Taken(resp)
    read = asyncio.create_task(read_directly(resp.content, taken))
    await taken.next()
    gate.open()
    assert await asyncio.wait_for(read, TIMEOUT) is None
    # The buffered bytes came out of aiohttp's buffer first, in one piece, handed over like
    # every later piece (after the switch, through the gate when there is one).
    assert taken.pieces == [b"data: early\n\ndata: more\n\n", b"late"]
    assert taken.kinds == [DirectReader, DirectReader]


async def test_an_end_stops_the_read_and_what_follows_is_read_as_aiohttp_reads_it(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    first, after = Gate(), Gate()
    resp = await _paced(upstream, http, [first, b"data: [DONE]\n\n", after, b"trailing bytes"])
    taken = Taken(resp, end_at=b"[DONE]")
    read = asyncio.create_task(read_directly(resp.content, taken))
    await asyncio.wait_for(first.reached.wait(), TIMEOUT)
    first.open()
    assert await asyncio.wait_for(read, TIMEOUT) == "ended"
    assert type(resp.content) is aiohttp.StreamReader
    await asyncio.wait_for(after.reached.wait(), TIMEOUT)
    after.open()
    # Buffered and read as usual (the tee's settle after the terminal reads it like this).
    assert await asyncio.wait_for(resp.content.read(), TIMEOUT) == b"trailing bytes"
    assert taken.pieces == [b"data: [DONE]\n\n"]


async def test_a_connection_broken_mid_body_is_raised_as_aiohttp_raises_it(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    resp = await _paced(upstream, http, [gate, b"data: partial", RESET])
    taken = Taken(resp)
    read = asyncio.create_task(read_directly(resp.content, taken))
    await asyncio.wait_for(gate.reached.wait(), TIMEOUT)
    gate.open()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(read, TIMEOUT)
    assert taken.pieces == [b"data: partial"]
    assert type(resp.content) is aiohttp.StreamReader


async def test_a_failing_tee_fails_its_read_not_the_parser(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    resp = await _paced(upstream, http, [gate, b"data: x\n\n"])

    def broken(piece: bytes) -> None:
        raise ValueError("a bug in the tee")

    read = asyncio.create_task(read_directly(resp.content, broken))
    await asyncio.wait_for(gate.reached.wait(), TIMEOUT)
    gate.open()
    with pytest.raises(ValueError, match="a bug in the tee"):
        await asyncio.wait_for(read, TIMEOUT)
    assert type(resp.content) is aiohttp.StreamReader
    resp.close()


async def test_a_cancelled_read_hands_the_reader_back(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gate = Gate()
    resp = await _paced(upstream, http, [gate, b"data: x\n\n"])
    read = asyncio.create_task(read_directly(resp.content, Taken(resp)))
    await asyncio.sleep(0)  # the read has switched the reader
    assert type(resp.content) is DirectReader
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    assert type(resp.content) is aiohttp.StreamReader
    gate.open()
    assert await asyncio.wait_for(resp.content.read(), TIMEOUT) == b"data: x\n\n"


async def test_a_terminal_in_the_bodys_last_read_leaves_the_connection_reusable(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The terminal and the end of the body in one read: the read ends inside the parser's
    ``feed_eof``, and the connection still goes back to the pool, clean."""
    gate = Gate()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        gate.reached.set()
        await gate.event.wait()
        # The last chunk and the body's end in one write (one read at the client).
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    upstream.raw("/last", handler)
    protocols = []
    for _ in range(3):
        gate.event.clear()
        gate.reached.clear()
        resp = await http.get(upstream.url + "/last")
        assert resp.connection is not None
        protocols.append(resp.connection.protocol)
        taken = Taken(resp, end_at=b"[DONE]")
        read = asyncio.create_task(read_directly(resp.content, taken))
        await asyncio.wait_for(gate.reached.wait(), TIMEOUT)
        await taken.next()  # "one" went through the direct read
        gate.open()
        assert await asyncio.wait_for(read, TIMEOUT) == "ended"
        assert resp.content.exception() is None
        assert resp.content.at_eof()
        assert b"".join(taken.pieces) == b"data: one\n\ndata: [DONE]\n\n"
        resp.release()
    # One keep-alive connection served all three.
    assert protocols[0] is protocols[1] is protocols[2]
