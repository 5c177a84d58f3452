"""The worker's collector settings (``streams.collector``)."""

from __future__ import annotations

import gc

from streams.collector import GC_THRESHOLDS, tune_gc


def test_tune_gc_raises_the_thresholds_and_freezes_the_start_up_objects() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 1000  # modules, config, ... are out of every collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
