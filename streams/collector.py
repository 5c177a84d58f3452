"""The worker's use of CPython's cyclic garbage collector (``gc``).

A worker's records are freed by reference counting as soon as they are handled; what the
cyclic collector finds is rare. Its cost is in walking the objects that live long: a full
collection visits every tracked object, and the conversation table holds tens of objects per
conversation (each state's history turns, lists and datetimes). Measured (ad-hoc, BENCHMARKS.md
session 10): one full collection with 200,000 restored states (6 history turns each, 6.8
million tracked objects) took 1.6 s, a stall of the whole worker, LLM calls and heartbeats
included; with those objects frozen, well under a millisecond.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["GC_THRESHOLDS", "freeze_long_lived", "tune_gc"]

log = logging.getLogger(__name__)

GC_THRESHOLDS = (50_000, 20, 100)
"""Collector thresholds of a worker (CPython's defaults: 700, 10, 10)."""


def tune_gc() -> None:
    """Collect less often in a worker: its records are freed by reference counting anyway.

    With CPython's defaults a worker spent ~15% of its CPU in the cyclic collector (1.97 s of
    12.6 s in ``switchboard bench pipeline --conversations 6000``, timed with
    ``gc.callbacks``); with ``GC_THRESHOLDS`` and the start-up objects frozen, 0.09 s. Objects
    in reference cycles live a little longer; nothing else changes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_long_lived() -> int:
    """Collect every generation, then move every object the collector tracks out of all future
    collections (``gc.freeze``); return how many were frozen.

    For a table just restored: its states live until their conversation changes, and a frozen
    object is still freed by reference counting when it is replaced or deleted. An object that
    is alive now and later becomes garbage *inside a reference cycle* is never freed (the
    collector no longer looks at it): call this once, when a worker has restored its table at
    start-up, not at every rebalance. The full collection first (one stall, while the restored
    partitions are still paused) keeps garbage that already exists out of the frozen set.
    """
    gc.collect()
    before = gc.get_freeze_count()
    gc.freeze()
    frozen = gc.get_freeze_count() - before
    log.info("froze %d long-lived objects after the first table restore", frozen)
    return frozen
