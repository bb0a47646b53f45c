"""``RunStore``: every Redis command the sidecar sends, and the translation of its failures.

Callers name runs by ``RunId`` and get typed results (``RunMeta``, ``Entry``, ``AppendResult``,
``FinalizeResult``); keys, scripts, reply shapes and redis-py's exceptions stay in here. Every
command's outcome also feeds ``Health``, so the orphan sweep can tell "this producer stopped
renewing its lease" from "nobody could reach Redis".

One Redis, Sentinel or Cluster (``SSE_SIDECAR_REDIS_URL``, ``url.py``), through the clients of
``connect.py``. What differs by topology stays in here:

- Cluster: every command and pipeline holds one of ``ClusterClients.slots`` (redis-py raises
  instead of waiting when a node's bounded pool is busy); a pipeline goes out as one pipelined
  write per node; every per-run command names one run's keys (one hash slot); scripts are loaded
  on every primary (``SCRIPT LOAD`` is not replicated: at start, after an outage, on NOSCRIPT);
  the epoch probe keeps one key on every primary.
- Sentinel: the failover watch runs as a supervised background task (``start``), and writes wait
  while a failover is under way (``connect.SentinelClients``).
- The live tail (``live_tail``): ``XREAD BLOCK`` on one Redis and Sentinel, sharded pub/sub
  wake-ups on a cluster (``tail.py``, ``cluster_tail.py``); the scripts publish those wake-ups
  only when the store uses them.
"""

from __future__ import annotations

import asyncio
import functools
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
from typing import TYPE_CHECKING, Any, Literal

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.backoff import EqualJitterBackoff
from redis.crc import key_slot

from sidecar.background import Background
from sidecar.errors import InvalidRunId, StoreBusy, StoreError, StoreUnavailable
from sidecar.keys import Keys, RunId, validate_run_id
from sidecar.store.batch import ReadBatcher
from sidecar.store.cluster_tail import ClusterRouting, ClusterTail, SingleRouting
from sidecar.store.connect import (
    POOL_IDLE_SECONDS,
    ClientOptions,
    ClusterClients,
    SentinelClients,
    connect,
    next_message,
    trim_idle,
)
from sidecar.store.entries import Entry, Page, parse_entries, parse_page, raw_reply, text
from sidecar.store.errors import FOREIGN, POOL_EXHAUSTED, translate, unavailable
from sidecar.store.meta import RunMeta
from sidecar.store.tail import BlockingTail, LiveTail, TailListener
from sidecar.store.url import parse_redis_url

if TYPE_CHECKING:
    from sidecar.telemetry import Metrics

log = logging.getLogger(__name__)


def _script(name: str) -> tuple[str, str]:
    text = resources.files("sidecar.store").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


APPEND_SCRIPT, APPEND_SHA = _script("append.lua")
FINALIZE_SCRIPT, FINALIZE_SHA = _script("finalize.lua")

TailMode = Literal["xread", "pubsub"]


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _pack(args: Iterable[bytes]) -> bytes:
    """One command in RESP, as redis-py's ``pack_command`` would send it."""
    parts = [_bulk(a) for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(parts)


def _append_command(keys: Keys, op: AppendOp, fixed: bytes, wake: bytes) -> bytes:
    """One run's call of the append script in RESP; ``fixed``: the packed lease TTL, stream TTL
    and length cap, the same for every run of a round trip; ``wake``: the packed wake flag."""
    parts = [
        b"*%d\r\n" % (14 + 2 * len(op.meta) + 4 * len(op.events)),
        _EVALSHA_HEAD,
        _bulk(keys.stream(op.run_id).encode()),
        _bulk(keys.meta(op.run_id).encode()),
        _bulk(op.producer.encode()),
        _bulk(op.claim.encode()),
        fixed,
        _bulk(b"%d" % op.known_last),
        _ONE if op.allow_gap else _ZERO,
        wake,
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
    rolled_back: int = 0  # events Redis had confirmed and no longer held (recorded as lost)
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


# Hash tags that land in a given slot (the epoch keys of a cluster), found once per slot.
_TAGS: dict[int, str] = {}


def tag_for_slot(slot: int) -> str:
    """A short hash tag whose keys live in ``slot``."""
    tag = _TAGS.get(slot)
    n = 0
    while tag is None:
        candidate = str(n)
        _TAGS.setdefault(key_slot(candidate.encode()), candidate)
        tag = _TAGS.get(slot)
        n += 1
    return tag


class RunStore:
    """The sidecar's Redis: a bounded general client, plus connections of their own for the
    live tail and the cancel channel."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        *,
        max_connections: int = 8,
        timeout: float = 2.0,
        metrics: Metrics | None = None,
        live_tail: TailMode | None = None,
        pool_idle_seconds: float = POOL_IDLE_SECONDS,
    ) -> None:
        self.keys = keys
        self.health = Health()
        self.metrics = metrics  # for the supervised tasks it starts (crashes are counted)
        self._timeout = timeout
        # Bounded: 1,000 replay readers catching up at once share these connections instead of
        # opening 1,000; a caller waits up to ``timeout`` for one (per node on a cluster).
        self._clients = connect(
            parse_redis_url(url),
            ClientOptions(
                max_connections=max_connections, timeout=timeout, connect_timeout=timeout
            ),
        )
        self._redis: Redis | RedisCluster = self._clients.general
        # Stream replies as sent, parsed once into entries (entries.py says why).
        self._redis.set_response_callback("XRANGE", raw_reply)
        cluster = isinstance(self._clients, ClusterClients)
        self.tail_mode: TailMode = live_tail or ("pubsub" if cluster else "xread")
        if cluster and self.tail_mode == "xread":
            raise ValueError("a cluster's live tail cannot block in one XREAD across slots")
        self._wake = "1" if self.tail_mode == "pubsub" else "0"
        self._watch: Background | None = None
        if isinstance(self._clients, SentinelClients):
            self._watch = Background("sse-sentinel-watch", self._clients.watch_failovers, metrics)
        # The connections a burst opened are closed once unused (connect.TrimmedPool); a
        # cluster's per-node pools are redis-py's own.
        self._trim: Background | None = None
        if isinstance(self._redis, Redis):
            pool = self._redis.connection_pool
            self._trim = Background(
                "sse-pool-trim", functools.partial(trim_idle, pool, pool_idle_seconds), metrics
            )
        self._epochs: dict[str, str] = {}  # epoch key -> the token this process saw there
        # Replay and status reads, coalesced under bursts (batch.py says why). A cluster's reads
        # go to the node of their slot through redis-py's cluster client instead.
        self._reads: ReadBatcher | None = (
            None
            if cluster
            else ReadBatcher(self._read_round_trip, max_inflight=max(1, max_connections // 2))
        )
        # Load the scripts before the next round trip: at start, and after Redis was away (it
        # may have restarted, or failed over to a replica, without them).
        self._load_scripts = True

    @property
    def topology(self) -> str:
        """``single``, ``sentinel`` or ``cluster``."""
        if isinstance(self._clients, ClusterClients):
            return "cluster"
        return "sentinel" if isinstance(self._clients, SentinelClients) else "single"

    def start(self) -> None:
        """Start what the store runs in the background (Sentinel's failover watch, the pool's
        idle trim)."""
        if self._watch is not None:
            self._watch.start()
        if self._trim is not None:
            self._trim.start()

    async def aclose(self) -> None:
        if self._reads is not None:
            await self._reads.aclose()
        if self._watch is not None:
            await self._watch.stop()
        if self._trim is not None:
            await self._trim.stop()
        await self._clients.aclose()

    # -- plumbing ----------------------------------------------------------------------------

    def failed(self, operation: str, exc: BaseException) -> StoreError:
        """The project's error for ``exc``; a Redis out of reach also marks the health down."""
        error = translate(operation, exc)
        if isinstance(error, StoreUnavailable) and not isinstance(error, StoreBusy):
            self.health.failed(error)
            self._load_scripts = True
        return error

    @asynccontextmanager
    async def _command(
        self, operation: str, *, write: bool = False
    ) -> AsyncIterator[Redis | RedisCluster]:
        """The general client for one command or pipeline: errors translated, health fed."""
        if (
            write
            and isinstance(self._clients, SentinelClients)
            and not await self._clients.wait_writable(self._timeout)
        ):
            error = StoreUnavailable(operation, "a failover of the primary is under way")
            self.health.failed(error)
            self._load_scripts = True
            raise error
        slots = self._clients.slots if isinstance(self._clients, ClusterClients) else None
        try:
            if slots is not None:
                try:
                    async with asyncio.timeout(self._timeout):
                        await slots.acquire()
                except TimeoutError:
                    raise StoreBusy(operation, POOL_EXHAUSTED) from None
            try:
                yield self._redis
            finally:
                if slots is not None:
                    slots.release()
        except FOREIGN as exc:
            raise self.failed(operation, exc) from exc
        self.health.ok()

    def dedicated(self, *, socket_timeout: float | None, retry: bool = True) -> Redis:
        """A client of its own single connection, for a command that blocks; ``retry=False``
        for a caller that retries on its own (redis-py would reconnect under it)."""
        if isinstance(self._clients, ClusterClients):
            raise TypeError("no single dedicated connection on a cluster")
        return self._clients.dedicated(socket_timeout=socket_timeout, retry=retry)

    async def unblock(self, client_id: int) -> bool:
        """``CLIENT UNBLOCK`` (the live tail's blocked read); whether it took effect."""
        async with self._command("follow") as redis:
            return bool(await redis.client_unblock(client_id))

    async def _ensure_scripts(self) -> None:
        """Load the scripts (on a cluster: on every primary), once after start or an outage."""
        if not self._load_scripts:
            return
        async with self._command("script_load") as redis:
            await redis.script_load(APPEND_SCRIPT)
            await redis.script_load(FINALIZE_SCRIPT)
        self._load_scripts = False

    # -- health ------------------------------------------------------------------------------

    async def probe(self) -> bool:
        """Check that Redis answers and still holds its data; True when it lost its data.

        An epoch key holds a random token that every sidecar remembers. A Redis that restarted
        empty (or was flushed, or failed over to an empty replica) no longer has the token the
        process saw, and each sidecar finds out within one probe, however quiet its runs are.
        On a cluster there is one epoch key on every primary (a hash tag of a slot it serves),
        so any primary that lost its data is noticed.
        """
        async with self._command("probe") as redis:
            if isinstance(redis, RedisCluster):
                await redis.initialize()  # the slot map, for the epoch keys (once)
            keys = self._epoch_keys()
            async with redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                current: list[Any] = await pipe.execute()
            missing = [key for key, token in zip(keys, current, strict=True) if token is None]
            if missing:
                async with redis.pipeline(transaction=False) as pipe:
                    for key in missing:
                        pipe.set(key, secrets.token_hex(8), nx=True)
                        pipe.get(key)
                    replies: list[Any] = await pipe.execute()
                found = dict(zip(missing, replies[1::2], strict=True))
                current = [found.get(key, token) for key, token in zip(keys, current, strict=True)]
        lost = False
        seen = {}
        for key, token in zip(keys, current, strict=True):
            before = self._epochs.get(key)
            seen[key] = text(token)
            lost = lost or (before is not None and before != seen[key])
        self._epochs = seen
        return lost

    def _epoch_keys(self) -> list[str]:
        if not isinstance(self._redis, RedisCluster):
            return [self.keys.epoch]
        # The lowest slot each primary serves, as the client's slot map (refreshed by MOVED
        # replies and failovers) says: a new or promoted primary gets its own key.
        first: dict[str, int] = {}
        for slot, nodes in self._redis.nodes_manager.slots_cache.items():
            if nodes and (name := nodes[0].name) not in first:
                first[name] = slot
        return [f"{self.keys.epoch}:{{{tag_for_slot(slot)}}}" for slot in sorted(first.values())]

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
        Raises ``StoreUnavailable`` when the round trip failed, as a whole or for some ops (a
        node lost mid-pipeline): then nothing or some ops ran, and every op is idempotent, so
        retry them all.
        """
        keys = self.keys
        # Scripts go to every primary on a cluster (not in a pipeline: one command per node);
        # on one Redis they lead this round trip.
        load = self._load_scripts and bool(ops)
        if load and isinstance(self._redis, RedisCluster):
            await self._ensure_scripts()
            load = False
        async with self._command("flush", write=True) as redis:
            if isinstance(redis, RedisCluster):
                replies = await self._cluster_round_trip(
                    redis, ops, lease_ttl_ms, stream_ttl_ms, maxlen, leases, ended, aliases
                )
            else:
                # One Redis (or Sentinel's primary): the round trip packed here (see _pack): the
                # fixed arguments once per call, then each run's meta and events.
                fixed = b"".join(_bulk(b"%d" % x) for x in (lease_ttl_ms, stream_ttl_ms, maxlen))
                wake = _bulk(self._wake.encode())
                commands: list[bytes] = []
                if load:
                    commands.append(_pack((b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode())))
                    commands.append(_pack((b"SCRIPT", b"LOAD", FINALIZE_SCRIPT.encode())))
                commands += [_append_command(keys, op, fixed, wake) for op in ops]
                if leases:
                    zadd: list[bytes] = [b"ZADD", keys.lease_index.encode()]
                    for run_id, deadline in leases.items():
                        zadd += [b"%d" % deadline, run_id.encode()]
                    commands.append(_pack(zadd))
                done = [r.encode() for r in ended]
                if done:
                    commands.append(_pack([b"ZREM", keys.lease_index.encode(), *done]))
                for protocol_id, run_id in (aliases or {}).items():
                    alias = (b"SET", keys.alias(protocol_id).encode(), run_id.encode())
                    commands.append(_pack((*alias, b"PX", b"%d" % stream_ttl_ms)))
                replies = await self._round_trip(redis, b"".join(commands), len(commands))
            if load:
                self._load_scripts = any(isinstance(r, Exception) for r in replies[:2])
                del replies[:2]
            for reply in replies:
                # A node lost mid-pipeline (its replies lost), a failover or a migration in
                # progress: not a refusal of that op. The whole round trip is retried.
                if isinstance(reply, Exception) and unavailable(reply):
                    raise reply
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
                            rolled_back=int(reply[6]),
                        )
                    )
                else:
                    results.append(AppendResult(_APPEND_CODES[code], detail=text(reply[1])))
        for reply in replies[len(ops) :]:
            if isinstance(reply, Exception):
                log.warning("lease index or alias update failed: %s", reply)
        if noscript:
            # A restarted Redis, a promoted replica, SCRIPT FLUSH: the caller sends those again.
            self._load_scripts = True
            await self._ensure_scripts()
        return results

    async def _cluster_round_trip(
        self,
        redis: RedisCluster,
        ops: Sequence[AppendOp],
        lease_ttl_ms: int,
        stream_ttl_ms: int,
        maxlen: int,
        leases: Mapping[RunId, int] | None,
        ended: Iterable[RunId],
        aliases: Mapping[RunId, RunId] | None,
    ) -> list[Any]:
        """``append``'s commands on a cluster: redis-py's cluster pipeline sends each node its
        share in one pipelined write (the scripts are already on every primary)."""
        keys = self.keys
        lease_ms, ttl_ms, cap = str(lease_ttl_ms), str(stream_ttl_ms), str(maxlen)
        async with redis.pipeline(transaction=False) as pipe:
            for op in ops:
                args: list[Any] = [
                    "EVALSHA",
                    APPEND_SHA,
                    2,
                    keys.stream(op.run_id),
                    keys.meta(op.run_id),
                    op.producer,
                    op.claim,
                    lease_ms,
                    ttl_ms,
                    cap,
                    op.known_last,
                    "1" if op.allow_gap else "0",
                    self._wake,
                    len(op.meta),
                ]
                for key, value in op.meta.items():
                    args.append(key)
                    args.append(value)
                for ev in op.events:
                    args.append(ev.seq)
                    args.append(ev.data)
                    args.append(ev.timestamp_ms)
                    args.append("true" if ev.complete else "false")
                pipe.execute_command(*args)
            if leases:
                pipe.zadd(keys.lease_index, dict(leases))  # type: ignore[arg-type]
            done = list(ended)
            if done:
                pipe.zrem(keys.lease_index, *done)
            for protocol_id, run_id in (aliases or {}).items():
                pipe.set(keys.alias(protocol_id), run_id, px=stream_ttl_ms)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _round_trip(self, redis: Redis, payload: bytes, replies: int) -> list[Any]:
        """Send packed commands on one pooled connection and read their replies (an error reply
        is returned, not raised), within ``timeout``.

        redis-py's pipeline would pack every argument again and wrap every reply's read in a
        timeout of its own: per event at the token rate, more than the script costs Redis. A
        round trip cut short (timeout, cancellation) leaves replies unread: that connection is
        closed, never handed back to the pool mid-reply.
        """
        pool = redis.connection_pool
        # The wait for a free connection is the pool's own (``timeout``; then StoreBusy). The
        # connect that follows is bounded here: while Redis refuses connections, redis-py's
        # connect retry alone would hold the round trip for seconds.
        async with asyncio.timeout(2 * self._timeout):
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]

        async def attempt() -> list[Any]:
            await conn.send_packed_command(payload, check_health=False)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await conn.read_response(timeout=math.inf))
                except redis_errors.ResponseError as exc:
                    out.append(exc)
            return out

        async def reconnect(_error: BaseException) -> None:
            await conn.disconnect()

        try:
            # The client's retry, as its pipeline would: a connection found dead (idle through
            # a Redis restart) is opened again and the whole round trip resent (every op is
            # idempotent).
            async with asyncio.timeout(self._timeout):
                return await conn.retry.call_with_retry(attempt, reconnect)  # type: ignore[no-any-return]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

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
        args.append(self._wake)
        args.append(len(meta))
        for key, value in meta.items():
            args += [key, value]
        for ev in events:
            args += [ev.seq, ev.data, ev.timestamp_ms, "true" if ev.complete else "false"]
        keys = (self.keys.stream(run_id), self.keys.meta(run_id))
        async with self._command("finalize", write=True) as redis:
            try:
                reply: Any = await redis.evalsha(FINALIZE_SHA, 2, *keys, *args)
            except redis_errors.NoScriptError:
                self._load_scripts = True
                reply = await redis.eval(FINALIZE_SCRIPT, 2, *keys, *args)
        status = _FINALIZE_CODES[int(reply[0])]
        last = int(reply[1]) if status in (FinalizeStatus.ENDED, FinalizeStatus.MOVED_ON) else 0
        return FinalizeResult(status, last)

    # -- reads -------------------------------------------------------------------------------

    async def _read_round_trip(self, payload: bytes, replies: int) -> list[Any]:
        """The batched reads' round trip (one Redis, or Sentinel's primary)."""
        async with self._command("read") as redis:
            assert isinstance(redis, Redis)
            return await self._round_trip(redis, payload, replies)

    async def _read(self, reads: ReadBatcher, operation: str, *args: bytes) -> Any:
        """One read through the batcher; an error reply raised as the store's error."""
        reply = await reads.call(_pack(args))
        if isinstance(reply, Exception):
            raise self.failed(operation, reply) from reply
        return reply

    async def meta(self, run_id: RunId) -> RunMeta | None:
        key = self.keys.meta(run_id)
        raw: Any
        if self._reads is not None:
            raw = await self._read(self._reads, "meta", b"HGETALL", key.encode())
            if isinstance(raw, list):  # RESP2 sends a hash as a flat list
                raw = dict(zip(raw[::2], raw[1::2], strict=True))
        else:
            async with self._command("meta") as redis:
                raw = await redis.hgetall(key)
        return RunMeta.from_hash(run_id, raw) if raw else None

    async def first_seq(self, run_id: RunId) -> int | None:
        """The seq of the oldest event still stored (older ones were trimmed or lost)."""
        head = await self._xrange(run_id, b"-", 1)
        return head[0].seq if head else None

    async def page_after(self, run_id: RunId, cursor: int, count: int) -> Page:
        """Up to ``count`` stored events with seq > ``cursor``, as a replay sends them: one
        ``Page`` (see ``entries.parse_page``)."""
        return parse_page(await self._xrange_raw(run_id, b"(%d-0" % cursor, count), cursor)

    async def _xrange(self, run_id: RunId, start: bytes, count: int) -> list[Entry]:
        return parse_entries(await self._xrange_raw(run_id, start, count))

    async def _xrange_raw(self, run_id: RunId, start: bytes, count: int) -> Any:
        """The raw reply of ``XRANGE key start + COUNT count``."""
        key = self.keys.stream(run_id)
        page: Any
        if self._reads is not None:
            page = await self._read(
                self._reads, "read", b"XRANGE", key.encode(), start, b"+", b"COUNT", b"%d" % count
            )
        else:
            async with self._command("read") as redis:
                page = await redis.xrange(key, start, "+", count=count)
        return page

    async def read_after(self, reads: Sequence[tuple[RunId, int]], count: int) -> list[list[Entry]]:
        """For many runs, up to ``count`` stored events after each cursor, as entries, in one
        pipelined round trip (one per node)."""
        async with self._command("follow") as redis, redis.pipeline(transaction=False) as pipe:
            for run_id, cursor in reads:
                pipe.xrange(self.keys.stream(run_id), f"({cursor}-0", "+", count=count)
            pages: list[Any] = await pipe.execute()
        return [parse_entries(page) for page in pages]

    async def length(self, run_id: RunId) -> int:
        """How many events of the run are stored."""
        async with self._command("read") as redis:
            n = await redis.xlen(self.keys.stream(run_id))
        return int(n)

    async def resolve_alias(self, protocol_id: RunId) -> RunId | None:
        """The run whose protocol named it ``protocol_id``, if one did (and is retained)."""
        async with self._command("alias") as redis:
            raw = await redis.get(self.keys.alias(protocol_id))
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
        async with self._command("read") as redis, redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.exists(self.keys.meta(run_id))
            replies: list[Any] = await pipe.execute()
        return {run_id for run_id, n in zip(run_ids, replies, strict=True) if int(n)}

    # -- the orphan sweep --------------------------------------------------------------------

    async def expired_leases(self, before_ms: int, limit: int) -> list[RunId]:
        """Runs of the lease index whose deadline is before ``before_ms`` (oldest first)."""
        async with self._command("sweep") as redis:
            found: Any = await redis.zrangebyscore(
                self.keys.lease_index, "-inf", before_ms, start=0, num=limit
            )
        return [RunId(text(member)) for member in found]

    async def forget_leases(self, run_ids: Sequence[RunId]) -> None:
        if not run_ids:
            return
        async with self._command("sweep", write=True) as redis:
            await redis.zrem(self.keys.lease_index, *run_ids)

    # -- cancel across replicas --------------------------------------------------------------

    async def publish_cancel(self, run_id: RunId) -> int:
        """Ask every replica to cancel ``run_id``; how many processes heard it (on a cluster:
        how many on the node that took the PUBLISH, which relays it to every other node)."""
        async with self._command("cancel") as redis:
            receivers = await redis.publish(self.keys.cancel_channel, run_id)
        return int(receivers)

    @asynccontextmanager
    async def cancel_requests(self) -> AsyncIterator[CancelRequests]:
        """A subscription to cancel requests; errors inside come out as ``StoreError``."""
        pubsub = self._clients.pubsub()
        try:
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
            except FOREIGN as exc:
                await self._after_lost_node()
                raise self.failed("cancel", exc) from exc
            yield CancelRequests(self, pubsub)
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except FOREIGN as exc:
                log.debug("closing the cancel subscription: %s", exc)

    async def _after_lost_node(self) -> None:
        """On a cluster, learn the slot map again: the node just tried may be gone."""
        if isinstance(self._clients, ClusterClients):
            try:
                await self._clients.refresh()
            except FOREIGN as exc:
                log.debug("cannot refresh the cluster's slot map: %s", exc)

    # -- the live tail -----------------------------------------------------------------------

    def live_tail(self, listener: TailListener) -> LiveTail:
        """The live tail of this topology (``tail.py``), reporting to ``listener``."""
        if self.tail_mode == "xread":
            return BlockingTail(self, listener)
        clients = self._clients
        if isinstance(clients, ClusterClients):
            return ClusterTail(self, ClusterRouting(clients.general, clients.node_pubsub), listener)
        return ClusterTail(self, SingleRouting(clients.pubsub), listener)


class CancelRequests:
    def __init__(self, store: RunStore, pubsub: PubSub) -> None:
        self._store = store
        self._pubsub = pubsub

    async def next(self, timeout: float) -> str | None:
        """The next requested run id, or None after ``timeout`` seconds without one."""
        try:
            message = await next_message(self._pubsub, timeout, ignore_subscribe_messages=True)
        except FOREIGN as exc:
            await self._store._after_lost_node()
            raise self._store.failed("cancel", exc) from exc
        return None if message is None else text(message.get("data", b""))
