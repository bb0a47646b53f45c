"""EventSource semantics against ``GET /sidecar/v1/runs/{run_id}/stream``.

A browser's ``EventSource`` (WHATWG HTML, "Server-sent events") reconnects whenever its connection
ends, sending ``Last-Event-ID`` with the last ``id:`` it saw, and gives up for good on any answer
that is not a 200 ``text/event-stream`` (a 204, a 4xx). DESIGN.md "The API" relies on exactly that:
every event carries ``id: <seq>``, the cursor comes from ``Last-Event-ID``, and a finished run with
nothing after the cursor answers 204 so the browser stops. ``EventSource`` below implements that
processing model (minus the DOM) on aiohttp and ``sidecar.sse.SSEDecoder``.

A real browser is not driven here: Debian ``chromium`` is not installed in this environment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum

import aiohttp
import pytest
import redis.asyncio

from sidecar.sse import Event, SSEDecoder
from tests.conftest import Gate, Sidecar, SidecarFactory, Step, Upstream
from tests.functional.helpers import DONE, ClientView, LiveReader, stop, stored, token

PATH = "/v1/agents/agent-1/messages/stream"


class ReadyState(IntEnum):
    CONNECTING = 0
    OPEN = 1
    CLOSED = 2


@dataclass(frozen=True)
class MessageEvent:
    type: str
    data: str
    last_event_id: str


@dataclass(frozen=True)
class Attempt:
    """One HTTP request the EventSource made: the answer, and the Last-Event-ID it sent."""

    status: int
    last_event_id: str | None


@dataclass
class EventSource:
    """The WHATWG EventSource processing model on aiohttp.

    - every request has ``Accept: text/event-stream`` and, once an ``id`` was seen,
      ``Last-Event-ID``;
    - a 200 ``text/event-stream`` response opens the connection; anything else fails it
      (``CLOSED``, no reconnection);
    - an ``id`` field sets the last-event-id buffer (kept across events, ignored when it holds
      NUL); ``retry`` sets the reconnection time; a block with data dispatches a MessageEvent;
    - when an open connection ends (EOF or network error) it reconnects after the
      reconnection time.

    ``drop_after`` simulates the network dropping the connection: once that many events were
    dispatched, the response is closed in the middle of whatever chunk it was in (the rest of
    the chunk is lost, as it would be). ``before_reconnect`` lets a test hold a reconnection.
    """

    http: aiohttp.ClientSession
    url: str
    reconnection_time: float = 0.005
    drop_after: set[int] = field(default_factory=set)
    before_reconnect: Callable[[], Awaitable[None]] | None = None
    ready_state: ReadyState = ReadyState.CONNECTING
    last_event_id: str = ""
    events: list[MessageEvent] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Connect, and reconnect, until the connection fails; returns once CLOSED."""
        while True:
            dropped = await self._connect()
            if self.ready_state is ReadyState.CLOSED:
                self._changed()
                return
            self.ready_state = ReadyState.CONNECTING
            self._changed()
            # The reconnection delay is the EventSource's own behaviour, not test synchronisation.
            await asyncio.sleep(self.reconnection_time)
            if self.before_reconnect is not None and dropped:
                await self.before_reconnect()

    async def _connect(self) -> bool:
        """One request; True when the connection was dropped by ``drop_after``."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            async with self.http.get(self.url, headers=headers) as resp:
                self.attempts.append(Attempt(resp.status, headers.get("Last-Event-ID")))
                if resp.status != 200 or resp.content_type != "text/event-stream":
                    self.ready_state = ReadyState.CLOSED  # "fail the connection"
                    return False
                self.ready_state = ReadyState.OPEN
                self._changed()
                decoder = SSEDecoder()
                async for chunk in resp.content.iter_any():
                    for item in decoder.feed(chunk):
                        if isinstance(item, Event):
                            self._process(item)
                            if len(self.events) in self.drop_after:
                                self.drop_after.discard(len(self.events))
                                resp.close()
                                return True
        except aiohttp.ClientError:
            pass  # a network error: reconnect, as after an EOF
        return False

    def _process(self, event: Event) -> None:
        if event.id is not None:
            self.last_event_id = event.id
        if event.retry is not None:
            self.reconnection_time = event.retry / 1000
        if event.data is not None:
            self.events.append(MessageEvent(event.event or "message", event.data,
                                            self.last_event_id))  # fmt: skip
            self._changed()

    def _changed(self) -> None:
        self._progress.set()

    async def wait(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._progress.clear()
                await self._progress.wait()


def run_steps(first: Gate, second: Gate) -> list[Step]:
    """Three events, a hold, three more, a hold, then the end: 9 events with [DONE]."""
    return [
        token("a"), token("b"), token("c"), first,
        token("d"), token("e"), token("f"), second,
        token("g"), stop("end_turn"), DONE,
    ]  # fmt: skip


N_EVENTS = 9


def replay_url(sc: Sidecar, run_id: str, query: str = "") -> str:
    return f"{sc.url}/sidecar/v1/runs/{run_id}/stream{query}"


async def check_complete(
    es: EventSource, live: ClientView, redis_client: redis.asyncio.Redis
) -> None:
    """The EventSource saw the run exactly once, in order, as the live client did."""
    assert [(e.type, e.data, e.last_event_id) for e in es.events] == [
        ("message" if e.event is None else e.event, e.data, e.id) for e in live.events
    ]
    assert [e.last_event_id for e in es.events] == [str(i) for i in range(1, N_EVENTS + 1)]
    assert es.events[-1].data == "[DONE]"
    rows = await stored(redis_client, live.run_id)
    assert [r["data"] for r in rows] == [
        f"id: {e.last_event_id}\ndata: {e.data}\n\n" for e in es.events
    ]


async def test_a_dropped_reader_reconnects_with_last_event_id_and_misses_nothing(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    first, second = Gate(), Gate()
    upstream.sse(PATH, run_steps(first, second))
    async with http.post(sidecar.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(3)
        run_id = resp.headers["X-Sidecar-Run-Id"]
        es = EventSource(http, replay_url(sidecar, run_id), drop_after={5})
        task = asyncio.create_task(es.run())
        await es.wait(lambda: len(es.events) == 3)
        first.open()
        # The connection drops after event 5 (live); the EventSource comes back with
        # Last-Event-ID: 5 while the run is held at the second gate.
        await es.wait(lambda: len(es.attempts) == 2 and es.ready_state is ReadyState.OPEN)
        await es.wait(lambda: len(es.events) == 6)
        assert es.attempts == [Attempt(200, None), Attempt(200, "5")]
        assert not second.event.is_set()
        second.open()
        await asyncio.wait_for(task, 5)
        body = await live.rest()
    # After [DONE] the server ends the response; the reconnection gets 204 and the
    # EventSource stops for good.
    assert es.attempts == [Attempt(200, None), Attempt(200, "5"), Attempt(204, str(N_EVENTS))]
    assert es.ready_state is ReadyState.CLOSED
    await check_complete(es, ClientView(200, dict(resp.headers), body), redis_client)


async def test_a_reader_that_comes_back_after_the_run_ended_catches_up_then_stops(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    first, second = Gate(), Gate()
    upstream.sse(PATH, run_steps(first, second))
    reconnect = asyncio.Event()

    async def held() -> None:
        await reconnect.wait()

    async with http.post(sidecar.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(3)
        run_id = resp.headers["X-Sidecar-Run-Id"]
        es = EventSource(http, replay_url(sidecar, run_id), drop_after={2}, before_reconnect=held)
        task = asyncio.create_task(es.run())
        await es.wait(lambda: es.ready_state is ReadyState.CONNECTING and len(es.events) == 2)
        # While the reader is away the run goes on and finishes.
        first.open()
        second.open()
        body = await live.rest()
    await sidecar.flushed()
    reconnect.set()
    await asyncio.wait_for(task, 5)
    assert es.attempts == [Attempt(200, None), Attempt(200, "2"), Attempt(204, str(N_EVENTS))]
    await check_complete(es, ClientView(200, dict(resp.headers), body), redis_client)


async def test_an_eventsource_stops_on_204_and_on_errors(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    upstream.sse(PATH, [token("a"), stop("end_turn"), DONE])
    async with http.post(sidecar.url + PATH, json={}) as resp:
        await resp.read()
        run_id = resp.headers["X-Sidecar-Run-Id"]
    await sidecar.flushed()
    # A finished run: everything, then the reconnection is answered 204.
    es = EventSource(http, replay_url(sidecar, run_id))
    await asyncio.wait_for(es.run(), 5)
    assert [e.data for e in es.events][1:] == [
        '{"message_type":"stop_reason","stop_reason":"end_turn","seq_id":2,"run_id":"'
        + run_id
        + '"}',
        "[DONE]",
    ]
    assert es.attempts == [Attempt(200, None), Attempt(204, "3")]
    # Unknown run, and an invalid run id: failed at once, never retried.
    for bad in ("run-never-existed", "bad%20id"):
        es = EventSource(http, replay_url(sidecar, bad))
        await asyncio.wait_for(es.run(), 5)
        assert es.attempts == [Attempt(404 if bad.startswith("run") else 400, None)]
        assert es.events == []
        assert es.ready_state is ReadyState.CLOSED


async def test_the_token_query_parameter_authorizes_an_eventsource(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(signing_key="k" * 32)
    other_gate = Gate()
    upstream.sse("/v1/other", [token("x"), other_gate, DONE])
    async with http.post(sc.url + "/v1/other", json={}) as other:
        await LiveReader(other).until(1)
        other_id = other.headers["X-Sidecar-Run-Id"]
        other_token = other.headers["X-Sidecar-Replay-Token"]
        other_gate.open()
        await other.read()

    first, second = Gate(), Gate()
    upstream.sse(PATH, run_steps(first, second))
    async with http.post(sc.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(3)
        run_id = resp.headers["X-Sidecar-Run-Id"]
        run_token = resp.headers["X-Sidecar-Replay-Token"]
        # No token, or another run's token: 401 / 403, and the EventSource gives up.
        for query, status in (("", 401), (f"?token={other_token}", 403), ("?token=x.1.y", 401)):
            denied = EventSource(http, replay_url(sc, run_id, query))
            await asyncio.wait_for(denied.run(), 5)
            assert denied.attempts == [Attempt(status, None)], query
        # The run's own token in the URL: kept across the reconnection (an EventSource cannot
        # set an Authorization header, and reconnects to the same URL).
        es = EventSource(http, replay_url(sc, run_id, f"?token={run_token}"), drop_after={4})
        task = asyncio.create_task(es.run())
        await es.wait(lambda: len(es.events) == 3)
        first.open()
        await es.wait(lambda: len(es.attempts) == 2 and len(es.events) == 6)
        second.open()
        await asyncio.wait_for(task, 5)
        body = await live.rest()
    assert es.attempts == [Attempt(200, None), Attempt(200, "4"), Attempt(204, str(N_EVENTS))]
    await check_complete(es, ClientView(200, dict(resp.headers), body), redis_client)
    # The other run's token does open the other run.
    es = EventSource(http, replay_url(sc, other_id, f"?token={other_token}"))
    await asyncio.wait_for(es.run(), 5)
    assert [e.data for e in es.events][-1] == "[DONE]"
    assert es.attempts == [Attempt(200, None), Attempt(204, "2")]


@pytest.mark.parametrize("drop_after", [1, 8])
async def test_drops_at_the_edges_of_a_finished_run(
    sidecar: Sidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
    drop_after: int,
) -> None:
    first, second = Gate(), Gate()
    first.open()
    second.open()
    upstream.sse(PATH, run_steps(first, second))
    async with http.post(sidecar.url + PATH, json={}) as resp:
        body = await resp.read()
    await sidecar.flushed()
    live = ClientView(200, dict(resp.headers), body)
    es = EventSource(http, replay_url(sidecar, live.run_id), drop_after={drop_after})
    await asyncio.wait_for(es.run(), 5)
    assert es.attempts == [
        Attempt(200, None),
        Attempt(200, str(drop_after)),
        Attempt(204, str(N_EVENTS)),
    ]
    await check_complete(es, live, redis_client)


async def test_a_reader_ahead_of_a_running_run_is_let_go_when_the_run_ends(
    make_sidecar: SidecarFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    sc = await make_sidecar(heartbeat_seconds=0.05)
    gate = Gate()
    upstream.sse(PATH, [token("a"), gate, token("b"), stop("end_turn"), DONE])
    async with http.post(sc.url + PATH, json={}) as resp:
        live = LiveReader(resp)
        await live.until(1)
        es = EventSource(http, replay_url(sc, resp.headers["X-Sidecar-Run-Id"]))
        es.last_event_id = "4"  # the run will end at seq 4: nothing after this cursor, ever
        task = asyncio.create_task(es.run())
        await es.wait(lambda: es.ready_state is ReadyState.OPEN)
        gate.open()
        await live.rest()
    await sc.flushed()
    # Expected: once the run has ended, the reader is let go (within a few heartbeats), and
    # its reconnection gets 204. Observed: the response stays open with ": ping" only.
    try:
        await asyncio.wait_for(task, 3)
    finally:
        task.cancel()
    assert es.attempts == [Attempt(200, "4"), Attempt(204, "4")]
    assert es.events == []
