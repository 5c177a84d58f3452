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
    """Move every object the collector tracks now out of all future collections
    (``gc.freeze``) after collecting the young generations; return how many were frozen.

    For a table just restored: its states live until their conversation changes, and a
    frozen object is still freed by reference counting when it is replaced or deleted. Only an
    object in a reference cycle that is already garbage in the oldest generation at this moment
    is never freed (the young generations are collected first); a worker's states and records
    form no cycles.
    """
    gc.collect(1)
    before = gc.get_freeze_count()
    gc.freeze()
    frozen = gc.get_freeze_count() - before
    log.debug("froze %d long-lived objects", frozen)
    return frozen
