"""``FanoutHistogram.observe_times`` counts exactly as that many ``observe`` calls would."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.telemetry import FanoutHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.0005, 0.001, 0.05, 0.1, 0.7, 3.0]), st.integers(1, 50)),
        max_size=12,
    )
)
def test_observe_times_is_that_many_observations(obs: list[tuple[float, int]]) -> None:
    bulk_registry, one_by_one_registry = CollectorRegistry(), CollectorRegistry()
    bulk = FanoutHistogram("lag", "h", buckets=BUCKETS, registry=bulk_registry)
    one_by_one = Histogram("lag", "h", buckets=BUCKETS, registry=one_by_one_registry)
    for amount, times in obs:
        bulk.observe_times(amount, times, {"trace_id": "ab"})
        for _ in range(times):
            one_by_one.observe(amount)
    got, want = samples(bulk_registry), samples(one_by_one_registry)
    assert got.keys() == want.keys()
    for key, value in want.items():
        # The sum is added as one product, not term by term: equal but for rounding.
        assert math.isclose(got[key], value, rel_tol=1e-9), key


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Every sample of the exposition but the creation time, by name and ``le``."""
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }
