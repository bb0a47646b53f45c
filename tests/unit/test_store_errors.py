"""The store's pure parts: which redis-py failures mean "Redis is not there right now" (retried)
rather than a refusal, and the hash tags of a cluster's per-primary epoch keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import exceptions as e
from redis.crc import key_slot

from sidecar.errors import StoreBusy, StoreError, StoreUnavailable
from sidecar.store.errors import translate, unavailable
from sidecar.store.runstore import tag_for_slot

AWAY = [
    e.ConnectionError("Connection reset by peer"),
    e.TimeoutError("Timeout reading from 10.0.0.1:6379"),
    e.BusyLoadingError("Redis is loading the dataset in memory"),
    e.ReadOnlyError("You can't write against a read only replica."),
    e.TryAgainError("Multiple keys request during rehashing of slot"),
    e.ClusterDownError("The cluster is down"),
    e.MasterDownError("Link with MASTER is down"),
    e.ClusterError("TTL exhausted."),
    e.SlotNotCoveredError('Slot "3377" is not covered by the cluster.'),
    e.ResponseError("NOREPLICAS Not enough good replicas to write."),
    OSError(104, "Connection reset by peer"),
    TimeoutError(),
]
REFUSED = [
    e.NoScriptError("No matching script. Please use EVAL."),
    e.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    e.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    e.ResponseError("Error running script (call to f_1): @user_script:9: bad argument"),
    e.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
]


@pytest.mark.parametrize("exc", AWAY, ids=lambda x: type(x).__name__)
def test_failures_of_reach_are_unavailable_and_retried(exc: BaseException) -> None:
    assert unavailable(exc)
    error = translate("flush", exc)
    assert isinstance(error, StoreUnavailable)
    assert not isinstance(error, StoreBusy)
    assert str(error).startswith("flush: ")


@pytest.mark.parametrize("exc", REFUSED, ids=lambda x: str(x)[:20])
def test_refusals_are_store_errors_not_outages(exc: BaseException) -> None:
    assert not unavailable(exc)
    error = translate("append", exc)
    assert type(error) is StoreError


@pytest.mark.parametrize(
    "exc",
    [e.MaxConnectionsError("Too many connections"), e.ConnectionError("No connection available.")],
)
def test_a_busy_pool_is_busy_not_down(exc: BaseException) -> None:
    assert isinstance(translate("meta", exc), StoreBusy)


@settings(deadline=None)  # the first search for a slot's tag takes ~16,000 CRCs
@given(st.integers(min_value=0, max_value=16383))
def test_an_epoch_key_tag_lands_in_the_slot_it_was_made_for(slot: int) -> None:
    tag = tag_for_slot(slot)
    assert key_slot(f"sse:run:epoch:{{{tag}}}".encode()) == slot
    assert len(tag) <= 6
