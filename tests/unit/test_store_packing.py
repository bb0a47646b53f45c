"""The writer's round trip is packed by hand (``sidecar.store.runstore``): byte for byte what
redis-py would send for the same append call."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from sidecar.keys import Keys, RunId
from sidecar.store.runstore import APPEND_SHA, AppendOp, Pending, _append_command, _bulk, _pack

KEYS = Keys("sse:run:")
texts = st.text(min_size=0, max_size=20)
events = st.builds(
    Pending,
    seq=st.integers(1, 10**12),
    data=st.binary(max_size=300),
    timestamp_ms=st.integers(0, 2**45),
    complete=st.booleans(),
)
ops = st.builds(
    AppendOp,
    run_id=st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True).map(RunId),
    producer=st.text(min_size=1, max_size=40),
    claim=st.sampled_from(("0", "1", "2")),
    known_last=st.integers(0, 10**12),
    allow_gap=st.booleans(),
    meta=st.dictionaries(texts, texts, max_size=4),
    events=st.lists(events, max_size=5),
)


def redis_py(*args: bytes | str | int) -> bytes:
    return b"".join(Connection().pack_command(*args))


@given(
    ops,
    st.integers(1, 10**6),
    st.integers(1, 10**9),
    st.integers(1, 10**6),
    st.sampled_from(("0", "1")),
)
def test_an_append_call_is_packed_as_redis_py_packs_it(
    op: AppendOp, lease_ms: int, ttl_ms: int, maxlen: int, wake: str
) -> None:
    args: list[bytes | str | int] = ["EVALSHA", APPEND_SHA, 2]
    args += [KEYS.stream(op.run_id), KEYS.meta(op.run_id)]
    args += [op.producer, op.claim, str(lease_ms), str(ttl_ms), str(maxlen), op.known_last]
    args += ["1" if op.allow_gap else "0", wake, len(op.meta)]
    for key, value in op.meta.items():
        args += [key, value]
    for ev in op.events:
        args += [ev.seq, ev.data, ev.timestamp_ms, "true" if ev.complete else "false"]
    fixed = b"".join(_bulk(str(x).encode()) for x in (lease_ms, ttl_ms, maxlen))
    assert _append_command(KEYS, op, fixed, _bulk(wake.encode())) == redis_py(*args)


@given(
    st.sampled_from((b"ZADD", b"ZREM", b"SET", b"SCRIPT")),
    st.lists(st.binary(max_size=50), max_size=6),
)
def test_the_other_commands_are_packed_as_redis_py_packs_them(
    name: bytes, args: list[bytes]
) -> None:
    assert _pack([name, *args]) == redis_py(name, *args)
