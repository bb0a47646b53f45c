"""``RunStore``: every Redis command the sidecar sends, and the translation of its failures.

Callers name runs by ``RunId`` and get typed results (``RunMeta``, ``Entry``, ``AppendResult``,
``FinalizeResult``); keys, scripts, reply shapes and redis-py's exceptions stay in here. Every
command's outcome also feeds ``Health``, so the orphan sweep can tell "this producer stopped
renewing its lease" from "nobody could reach Redis".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.backoff import EqualJitterBackoff

from sidecar.errors import InvalidRunId, StoreBusy, StoreError, StoreUnavailable
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.store.meta import RunMeta

log = logging.getLogger(__name__)


def _script(name: str) -> tuple[str, str]:
    text = resources.files("sidecar.store").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


APPEND_SCRIPT, APPEND_SHA = _script("append.lua")
FINALIZE_SCRIPT, FINALIZE_SHA = _script("finalize.lua")


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _pack(args: Iterable[bytes]) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` would send it."""
    parts = [_bulk(a) for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(parts)


def _append_command(keys: Keys, op: AppendOp, fixed: bytes) -> bytes:
    """One run's call of the append script in RESP; ``fixed``: the packed lease TTL, stream TTL
    and length cap, the same for every run of a round trip."""
    parts = [
        b"*%d\r\n" % (13 + 2 * len(op.meta) + 4 * len(op.events)),
        _EVALSHA_HEAD,
        _bulk(keys.stream(op.run_id).encode()),
        _bulk(keys.meta(op.run_id).encode()),
        _bulk(op.producer.encode()),
        _bulk(op.claim.encode()),
        fixed,
        _bulk(b"%d" % op.known_last),
        _ONE if op.allow_gap else _ZERO,
        _bulk(b"%d" % len(op.meta)),
    ]
    for key, value in op.meta.items():
        parts.append(_bulk(key.encode()))
        parts.append(_bulk(value.encode()))
    for ev in op.events:
        parts.append(_bulk(b"%d" % ev.seq))
        parts.append(_bulk(ev.data))
        parts.append(_bulk(b"%d" % ev.timestamp_ms))
        parts.append(_TRUE if ev.complete else _FALSE)
    return b"".join(parts)


# The parts of every append call that never change: the command, the script, its two keys.
_EVALSHA_HEAD = _bulk(b"EVALSHA") + _bulk(APPEND_SHA.encode()) + _bulk(b"2")
_ZERO, _ONE = _bulk(b"0"), _bulk(b"1")
_TRUE, _FALSE = _bulk(b"true"), _bulk(b"false")

# Failures that say nothing about the data: Redis is away, busy loading, or failing over. The
# caller retries later; the rest (a script error, OOM, a wrong type) are refusals.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
    redis_errors.MaxConnectionsError,
    OSError,
    TimeoutError,
)
_FOREIGN: tuple[type[BaseException], ...] = (redis_errors.RedisError, OSError, TimeoutError)
# What redis-py's blocking pool raises (a plain ConnectionError) when no connection came free.
_POOL_EXHAUSTED = "No connection available."


def translate(operation: str, exc: BaseException) -> StoreError:
    """The project's error for a foreign one (the one place where redis-py's errors end)."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, redis_errors.MaxConnectionsError) or str(exc) == _POOL_EXHAUSTED:
        return StoreBusy(operation, message)
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(operation, message)
    return StoreError(operation, message)


def text(value: Any) -> str:
    """A reply value as text (replies are bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def backoff(base: float, cap: float) -> Callable[[int], float]:
    """Seconds to wait before retry number ``n`` (1-based): capped exponential, half jittered,
    so that many sidecars do not hammer a recovering Redis in step (redis-py's own backoff)."""
    return EqualJitterBackoff(cap=cap, base=base).compute


class Health:
    """Whether Redis answers this process, and since when without a break.

    ``up_for()`` is what the orphan sweep trusts before it judges a lease: a producer cannot be
    blamed for a lease that lapsed while Redis was unreachable (or frozen) for everybody.
    """

    def __init__(self) -> None:
        self._since: float | None = None
        self.last_error: str | None = None

    def ok(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def failed(self, error: StoreError) -> None:
        self._since = None
        self.last_error = str(error)

    @property
    def up(self) -> bool:
        return self._since is not None

    @property
    def down(self) -> bool:
        """The last command failed (not merely: none was sent yet)."""
        return self._since is None and self.last_error is not None

    def up_for(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since


@dataclass(slots=True, frozen=True)
class Entry:
    """One stored event: its bytes exactly as the live client received them."""

    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> Entry:
    raw_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    data = fields.get(b"data", b"")
    return Entry(
        seq=int(raw_id.split("-", 1)[0]),
        data=data if isinstance(data, bytes) else str(data).encode(),
        timestamp_ms=int(fields.get(b"timestamp", b"0")),
        complete=fields.get(b"complete") == b"true",
    )


@dataclass(slots=True)
class Pending:
    """One event waiting for the writer's round trip."""

    seq: int
    data: bytes
    timestamp_ms: int
    complete: bool
    # Meta fields set with (or after) this event: written in the same round trip as the event,
    # never earlier, so the meta always agrees with the stored events.
    meta: dict[str, str] | None = None


@dataclass(slots=True)
class AppendOp:
    """One run's part of a writer round trip: one call of ``append.lua``."""

    run_id: RunId
    producer: str
    claim: str  # "0": none; "1": may replace a finished run; "2": only a run id nothing is under
    known_last: int
    allow_gap: bool
    meta: Mapping[str, str]
    events: Sequence[Pending]


class AppendStatus(Enum):
    OK = "ok"
    CONFLICT = "conflict"  # another producer holds a live lease: the claim is refused
    EXISTS = "exists"  # a run is stored under the id and the claim may not replace it
    FENCED = "fenced"  # another producer took the run over
    GAP = "gap"  # the batch would leave a hole in the seqs
    RETRY = "retry"  # not executed (the script was not loaded); send it again
    REJECTED = "rejected"  # Redis refused the call (e.g. out of memory)


@dataclass(slots=True, frozen=True)
class AppendResult:
    status: AppendStatus
    added: int = 0
    trimmed: int = 0
    last_seq: int = 0
    rebuilt: bool = False  # the meta had vanished (Redis lost the run) and was rebuilt
    replaced: bool = False  # the claim replaced a stored run (a new generation of the run id)
    detail: str = ""  # the holder, or Redis' error message


_APPEND_CODES = {
    -1: AppendStatus.CONFLICT,
    -2: AppendStatus.FENCED,
    -3: AppendStatus.GAP,
    -4: AppendStatus.EXISTS,
}


class FinalizeStatus(Enum):
    ENDED = "ended"  # this call ended the run
    ALREADY_ENDED = "already_ended"
    ALIVE = "alive"  # the producer's lease is live (Redis' clock)
    MOVED_ON = "moved_on"  # events arrived since the caller read the meta: read again
    MISSING = "missing"


@dataclass(slots=True, frozen=True)
class FinalizeResult:
    status: FinalizeStatus
    last_seq: int = 0


_FINALIZE_CODES = {
    1: FinalizeStatus.ENDED,
    0: FinalizeStatus.ALREADY_ENDED,
    -1: FinalizeStatus.ALIVE,
    -2: FinalizeStatus.MOVED_ON,
    -4: FinalizeStatus.MISSING,
}


class RunStore:
    """The sidecar's Redis: one bounded pool, plus dedicated connections made on demand."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        *,
        max_connections: int = 8,
        timeout: float = 2.0,
    ) -> None:
        self.keys = keys
        self.health = Health()
        self._url = url
        self._timeout = timeout
        # Bounded: 1,000 replay readers catching up at once share these connections instead of
        # opening 1,000; a caller waits up to ``timeout`` for one.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._epoch: str | None = None
        # Load the append script with the next round trip: at start, and after Redis was away
        # (it may have restarted without its scripts), so that round trip does not fail.
        self._load_append = True

    async def aclose(self) -> None:
        await self._redis.aclose()

    # -- plumbing ----------------------------------------------------------------------------

    def _fail(self, operation: str, exc: BaseException) -> StoreError:
        error = translate(operation, exc)
        if isinstance(error, StoreUnavailable) and not isinstance(error, StoreBusy):
            self.health.failed(error)
            self._load_append = True
        return error

    def dedicated(self, *, socket_timeout: float | None) -> Redis:
        """A client of its own single connection, for a command that blocks (or a pub/sub)."""
        return Redis.from_url(
            self._url,
            single_connection_client=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=self._timeout,
        )

    # -- health ------------------------------------------------------------------------------

    async def probe(self) -> bool:
        """Check that Redis answers and still holds its data; True when it lost its data.

        The epoch key holds a random token that every sidecar remembers. A Redis that restarted
        empty (or was flushed, or failed over to an empty replica) no longer has the token the
        process saw, and each sidecar finds out within one probe, however quiet its runs are.
        """
        try:
            current = await self._redis.get(self.keys.epoch)
            if current is None:
                await self._redis.set(self.keys.epoch, secrets.token_hex(8), nx=True)
                current = await self._redis.get(self.keys.epoch)
        except _FOREIGN as exc:
            raise self._fail("probe", exc) from exc
        self.health.ok()
        epoch = text(current)
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return lost

    # -- the writer --------------------------------------------------------------------------

    async def append(
        self,
        ops: Sequence[AppendOp],
        *,
        lease_ttl_ms: int,
        stream_ttl_ms: int,
        maxlen: int,
        leases: Mapping[RunId, int] | None = None,
        ended: Iterable[RunId] = (),
        aliases: Mapping[RunId, RunId] | None = None,
    ) -> list[AppendResult]:
        """One round trip: every op's script call, the lease index's updates and new aliases.

        ``leases`` adds runs to the lease index with their deadline (ms); ``ended`` removes
        finished runs from it; ``aliases`` maps protocol ids to run ids (with the stream TTL).
        Raises ``StoreUnavailable`` when the round trip failed as a whole (then nothing or some
        ops ran: every op is idempotent, so retry them all).
        """
        keys = self.keys
        load = self._load_append and bool(ops)
        # The round trip's commands, packed here (see _pack): a run's fixed arguments once per
        # call, then its meta and events.
        fixed = b"".join(_bulk(str(x).encode()) for x in (lease_ttl_ms, stream_ttl_ms, maxlen))
        commands: list[bytes] = []
        if load:
            commands.append(_pack((b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode())))
        commands += [_append_command(keys, op, fixed) for op in ops]
        if leases:
            zadd: list[bytes] = [b"ZADD", keys.lease_index.encode()]
            for run_id, deadline in leases.items():
                zadd += [b"%d" % deadline, run_id.encode()]
            commands.append(_pack(zadd))
        done = list(ended)
        if done:
            commands.append(
                _pack([b"ZREM", keys.lease_index.encode(), *(r.encode() for r in done)])
            )
        for protocol_id, run_id in (aliases or {}).items():
            alias = (b"SET", keys.alias(protocol_id).encode(), run_id.encode())
            commands.append(_pack((*alias, b"PX", b"%d" % stream_ttl_ms)))
        try:
            replies = await self._round_trip(b"".join(commands), len(commands))
        except _FOREIGN as exc:
            raise self._fail("flush", exc) from exc
        self.health.ok()
        if load:
            self._load_append = isinstance(replies.pop(0), Exception)
        results: list[AppendResult] = []
        noscript = False
        for reply in replies[: len(ops)]:
            if isinstance(reply, redis_errors.NoScriptError):
                noscript = True
                results.append(AppendResult(AppendStatus.RETRY))
            elif isinstance(reply, Exception):
                results.append(AppendResult(AppendStatus.REJECTED, detail=str(reply)))
            else:
                code = int(reply[0])
                if code == 0:
                    results.append(
                        AppendResult(
                            AppendStatus.OK,
                            added=int(reply[1]),
                            trimmed=int(reply[2]),
                            last_seq=int(reply[3]),
                            rebuilt=int(reply[4]) == 1,
                            replaced=int(reply[5]) == 1,
                        )
                    )
                else:
                    results.append(AppendResult(_APPEND_CODES[code], detail=text(reply[1])))
        for reply in replies[len(ops) :]:
            if isinstance(reply, Exception):
                log.warning("lease index or alias update failed: %s", reply)
        if noscript:
            # Redis restarted (or SCRIPT FLUSH): load the script; the caller sends those again.
            await self._load(APPEND_SCRIPT)
        return results

    async def _round_trip(self, payload: bytes, replies: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their replies (an error reply
        is returned, not raised), all within one ``timeout``.

        redis-py's pipeline would pack every argument again and wrap every reply's read in a
        timeout of its own: per event at the token rate, more than the script costs Redis. A
        round trip cut short (timeout, cancellation) leaves replies unread: that connection is
        closed, never handed back to the pool mid-reply.
        """
        conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self._timeout):
                await conn.send_packed_command(payload, check_health=False)
                out: list[Any] = []
                for _ in range(replies):
                    try:
                        out.append(await conn.read_response(timeout=math.inf))
                    except redis_errors.ResponseError as exc:
                        out.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await self._pool.release(conn)
        return out

    async def _load(self, script: str) -> None:
        try:
            await self._redis.script_load(script)
        except _FOREIGN as exc:
            raise self._fail("script_load", exc) from exc

    # -- ending a run its producer cannot end ----------------------------------------------

    async def finalize(
        self,
        run_id: RunId,
        *,
        finalizer: str,
        expected_last: int,
        require_dead: bool,
        ttl_seconds: int,
        meta: Mapping[str, str],
        events: Sequence[Pending],
    ) -> FinalizeResult:
        """Append ``events`` and ``meta`` atomically, unless the run ended or moved on."""
        args: list[Any] = [finalizer, expected_last, "1" if require_dead else "0"]
        args.append(ttl_seconds * 1000)
        args.append(len(meta))
        for key, value in meta.items():
            args += [key, value]
        for ev in events:
            args += [ev.seq, ev.data, ev.timestamp_ms, "true" if ev.complete else "false"]
        keys = (self.keys.stream(run_id), self.keys.meta(run_id))
        try:
            try:
                reply: Any = await self._redis.evalsha(FINALIZE_SHA, 2, *keys, *args)
            except redis_errors.NoScriptError:
                reply = await self._redis.eval(FINALIZE_SCRIPT, 2, *keys, *args)
        except _FOREIGN as exc:
            raise self._fail("finalize", exc) from exc
        self.health.ok()
        status = _FINALIZE_CODES[int(reply[0])]
        last = int(reply[1]) if status in (FinalizeStatus.ENDED, FinalizeStatus.MOVED_ON) else 0
        return FinalizeResult(status, last)

    # -- reads -------------------------------------------------------------------------------

    async def meta(self, run_id: RunId) -> RunMeta | None:
        try:
            raw = await self._redis.hgetall(self.keys.meta(run_id))
        except _FOREIGN as exc:
            raise self._fail("meta", exc) from exc
        self.health.ok()
        return RunMeta.from_hash(run_id, raw) if raw else None

    async def first_seq(self, run_id: RunId) -> int | None:
        """The seq of the oldest event still stored (older ones were trimmed or lost)."""
        try:
            head: Any = await self._redis.xrange(self.keys.stream(run_id), "-", "+", count=1)
        except _FOREIGN as exc:
            raise self._fail("read", exc) from exc
        self.health.ok()
        return parse_entry(*head[0]).seq if head else None

    async def entries_after(self, run_id: RunId, cursor: int, count: int) -> list[Entry]:
        """Up to ``count`` stored events with seq > ``cursor``, in order."""
        try:
            page: Any = await self._redis.xrange(
                self.keys.stream(run_id), f"({cursor}-0", "+", count=count
            )
        except _FOREIGN as exc:
            raise self._fail("read", exc) from exc
        self.health.ok()
        return [parse_entry(entry_id, fields) for entry_id, fields in page]

    async def length(self, run_id: RunId) -> int:
        """How many events of the run are stored."""
        try:
            n = await self._redis.xlen(self.keys.stream(run_id))
        except _FOREIGN as exc:
            raise self._fail("read", exc) from exc
        self.health.ok()
        return int(n)

    async def resolve_alias(self, protocol_id: RunId) -> RunId | None:
        """The run whose protocol named it ``protocol_id``, if one did (and is retained)."""
        try:
            raw = await self._redis.get(self.keys.alias(protocol_id))
        except _FOREIGN as exc:
            raise self._fail("alias", exc) from exc
        self.health.ok()
        if raw is None:
            return None
        try:
            return validate_run_id(text(raw))
        except InvalidRunId:
            return None

    async def existing(self, run_ids: Sequence[RunId]) -> set[RunId]:
        """Which of these runs Redis still holds (one pipelined round trip)."""
        if not run_ids:
            return set()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.exists(self.keys.meta(run_id))
                replies: list[Any] = await pipe.execute()
        except _FOREIGN as exc:
            raise self._fail("read", exc) from exc
        self.health.ok()
        return {run_id for run_id, n in zip(run_ids, replies, strict=True) if int(n)}

    # -- the orphan sweep --------------------------------------------------------------------

    async def expired_leases(self, before_ms: int, limit: int) -> list[RunId]:
        """Runs of the lease index whose deadline is before ``before_ms`` (oldest first)."""
        try:
            found: Any = await self._redis.zrangebyscore(
                self.keys.lease_index, "-inf", before_ms, start=0, num=limit
            )
        except _FOREIGN as exc:
            raise self._fail("sweep", exc) from exc
        self.health.ok()
        return [RunId(text(member)) for member in found]

    async def forget_leases(self, run_ids: Sequence[RunId]) -> None:
        if not run_ids:
            return
        try:
            await self._redis.zrem(self.keys.lease_index, *run_ids)
        except _FOREIGN as exc:
            raise self._fail("sweep", exc) from exc
        self.health.ok()

    # -- cancel across replicas --------------------------------------------------------------

    async def publish_cancel(self, run_id: RunId) -> int:
        """Ask every replica to cancel ``run_id``; how many processes heard it."""
        try:
            receivers = await self._redis.publish(self.keys.cancel_channel, run_id)
        except _FOREIGN as exc:
            raise self._fail("cancel", exc) from exc
        self.health.ok()
        return int(receivers)

    @asynccontextmanager
    async def cancel_requests(self) -> AsyncIterator[CancelRequests]:
        """A subscription to cancel requests; errors inside come out as ``StoreError``."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
            except _FOREIGN as exc:
                raise self._fail("cancel", exc) from exc
            yield CancelRequests(self, pubsub)
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except _FOREIGN as exc:
                log.debug("closing the cancel subscription: %s", exc)

    # -- the live tail -----------------------------------------------------------------------

    def tail(self) -> Tail:
        return Tail(self)


class CancelRequests:
    def __init__(self, store: RunStore, pubsub: PubSub) -> None:
        self._store = store
        self._pubsub = pubsub

    async def next(self, timeout: float) -> str | None:
        """The next requested run id, or None after ``timeout`` seconds without one."""
        try:
            # get_message with a timeout, not listen(): listen() can swallow the cancellation
            # that stops the listener's task (redis-py 8), hanging shutdown.
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=timeout
            )
        except _FOREIGN as exc:
            raise self._store._fail("cancel", exc) from exc
        return None if message is None else text(message.get("data", b""))


class Tail:
    """The shared live tail's Redis side: one dedicated connection blocked in ``XREAD``.

    ``read`` blocks on every given run at once, each from its own cursor; ``interrupt`` ends a
    blocked read early (``CLIENT UNBLOCK`` from the pool) when the set of runs must change.
    """

    # A blocked read returns at least this often, so a silently dead connection is noticed.
    BLOCK_MS = 5000

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._client = store.dedicated(socket_timeout=self.BLOCK_MS / 1000 + 5)
        self._client_id: int | None = None
        self._blocking = False
        self._unblocking: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def read(self, positions: Mapping[RunId, int], count: int) -> dict[RunId, list[Entry]]:
        keys = self._store.keys
        try:
            if self._client_id is None:
                self._client_id = int(await self._client.client_id())
            self._blocking = True
            try:
                reply: Any = await self._client.xread(
                    {keys.stream(run_id): f"{seq}-0" for run_id, seq in positions.items()},
                    count=count,
                    block=self.BLOCK_MS,
                )
            finally:
                self._blocking = False
        except _FOREIGN as exc:
            self._client_id = None
            raise self._store._fail("follow", exc) from exc
        self._store.health.ok()
        out: dict[RunId, list[Entry]] = {}
        for raw_key, entries in reply or ():
            run_id = keys.run_id_of(text(raw_key))
            out[run_id] = [parse_entry(entry_id, fields) for entry_id, fields in entries]
        return out

    def interrupt(self) -> None:
        if self._blocking and self._unblocking is None and self._client_id is not None:
            # Kept referenced until done: the loop holds tasks only weakly.
            self._unblocking = asyncio.get_running_loop().create_task(
                self._unblock(self._client_id)
            )

    async def _unblock(self, client_id: int) -> None:
        redis = self._store._redis
        try:
            # The XREAD may be on its way but not yet blocked in Redis, where UNBLOCK finds
            # nothing to do: try again until it took effect or the read returned by itself.
            while self._blocking and not await redis.client_unblock(client_id):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        except _FOREIGN as exc:
            log.warning("cannot interrupt the blocked live-tail read: %s", exc)
        finally:
            self._unblocking = None
