"""The fault suite's TCP forwarder: pass, delay, blackhole (accept and hold), reset."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis import exceptions as redis_errors

from tests.conftest import RedisServer
from tests.faults.forwarder import Forwarder, ForwarderProcess, Mode


class Echo:
    """A real TCP echo server; remembers how each of its connections ended."""

    def __init__(self) -> None:
        self.port = 0
        self.endings: list[str] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                writer.write(chunk)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            writer.close()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    yield server
    await server.aclose()


@pytest.fixture
async def forwarder(echo: Echo) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(echo.port)
    await fwd.start()
    yield fwd
    await fwd.aclose()


async def connect(fwd: Forwarder) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", fwd.port)


async def echoed(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def test_pass_relays_every_byte_in_order(forwarder: Forwarder) -> None:
    reader, writer = await connect(forwarder)
    payload = os.urandom(3 << 20)  # many chunks each way
    writer.write(payload)
    assert await echoed(reader, len(payload)) == payload
    assert forwarder.relayed == 2 * len(payload)
    assert forwarder.accepted == 1
    assert forwarder.open_connections == 1
    writer.close()


async def test_delay_holds_each_chunk_without_reordering(forwarder: Forwarder) -> None:
    reader, writer = await connect(forwarder)
    writer.write(b"warm")
    assert await echoed(reader, 4) == b"warm"
    forwarder.delay = 0.2
    started = time.monotonic()
    for i in range(5):
        writer.write(b"%d" % i)
        await writer.drain()
    assert await echoed(reader, 5) == b"01234"
    # Out and back: at least the delay twice (a lower bound: never flaky on a slow machine).
    assert time.monotonic() - started >= 0.4
    writer.close()


async def test_blackhole_accepts_and_holds_then_delivers_on_pass(
    forwarder: Forwarder, echo: Echo
) -> None:
    old_reader, old_writer = await connect(forwarder)
    old_writer.write(b"a")
    assert await echoed(old_reader, 1) == b"a"
    forwarder.blackhole()
    assert forwarder.mode is Mode.BLACKHOLE
    old_writer.write(b"held")
    new_reader, new_writer = await connect(forwarder)  # the connect itself succeeds
    new_writer.write(b"new")
    relayed = forwarder.relayed
    for reader in (old_reader, new_reader):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
    assert forwarder.relayed == relayed
    assert forwarder.accepted == 2
    forwarder.pass_()
    assert await echoed(old_reader, 4) == b"held"
    assert await echoed(new_reader, 3) == b"new"
    old_writer.close()
    new_writer.close()


async def test_reset_aborts_both_sides_then_accepts_again(forwarder: Forwarder, echo: Echo) -> None:
    reader, writer = await connect(forwarder)
    writer.write(b"x")
    assert await echoed(reader, 1) == b"x"
    forwarder.blackhole()
    held_reader, held_writer = await connect(forwarder)  # accepted, not yet connected on
    assert forwarder.reset() == 2
    for r in (reader, held_reader):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(1), 5)
    await asyncio.sleep(0.05)  # the echo server's read of the RST has no event to await
    assert echo.endings == ["reset"]  # the held one never reached the server
    assert forwarder.open_connections == 0
    forwarder.pass_()
    reader2, writer2 = await connect(forwarder)
    writer2.write(b"again")
    assert await echoed(reader2, 5) == b"again"
    writer.close()
    held_writer.close()
    writer2.close()


async def test_redis_through_the_forwarder(redis_server: RedisServer) -> None:
    fwd = Forwarder(redis_server.port)
    await fwd.start()
    client = redis.asyncio.Redis.from_url(fwd.url, socket_timeout=0.3)
    try:
        assert await client.ping()
        fwd.blackhole()
        with pytest.raises(redis_errors.TimeoutError):
            await client.ping()
        fwd.reset()
        fwd.pass_()
        assert await client.ping()  # a new connection
        fwd.reset()
        with pytest.raises(redis_errors.ConnectionError):
            await client.ping()
        assert await client.ping()
    finally:
        await client.aclose()
        await fwd.aclose()


async def test_the_forwarder_as_a_process(redis_server: RedisServer) -> None:
    fwd = ForwarderProcess(redis_server.port)
    await fwd.start()
    client = redis.asyncio.Redis.from_url(fwd.url, socket_timeout=0.3)
    try:
        assert await client.ping()
        before = await fwd.stats()
        assert (before["mode"], before["accepted"], before["open"]) == ("pass", 1, 1)
        await fwd.blackhole()
        with pytest.raises(redis_errors.TimeoutError):
            await client.ping()
        assert await fwd.reset() == 1
        await fwd.pass_()
        await fwd.set_delay(0.2)
        patient = redis.asyncio.Redis.from_url(fwd.url, socket_timeout=5)
        started = time.monotonic()
        assert await patient.ping()
        assert time.monotonic() - started >= 0.4  # out and back
        await patient.aclose()
        after = await fwd.stats()
        assert (after["mode"], after["accepted"], after["resets"]) == ("pass", 2, 1)
        assert after["relayed"] > before["relayed"]
    finally:
        await client.aclose()
        await fwd.aclose()
