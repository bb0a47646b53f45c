"""``sidecar.runtime.tune_gc``: what serve() does to the collector once the process started."""

from __future__ import annotations

import gc

from sidecar.runtime import GC_THRESHOLDS, tune_gc


def test_tune_gc_freezes_the_startup_heap_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS == (10_000, 50, 100)
        # Everything alive at the call is out of the collector's view from then on.
        assert gc.get_freeze_count() > 10_000
        assert gc.get_count()[0] < 100
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
