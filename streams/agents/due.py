"""When each conversation next needs a timer tick: the index the conversation stage's timer reads.

A worker's table can hold hundreds of thousands of conversation states (ended ones are kept
``ended_retention_s``, 24 h by default), so the timer must neither look at every state on each
run nor hold the event loop while it rebuilds its index. :class:`DueIndex` keeps one dict entry
per conversation with a due time and two min-heaps over those entries (*live* ticks and
*prunes*), with lazy deletion: a heap entry whose dict entry changed or went away is skipped
when it surfaces.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable
from datetime import datetime
from enum import IntEnum
from typing import Protocol

from processors.config import ConversationConfig
from processors.conversation import next_due_at
from processors.conversation_state import ENDED, ConversationState

__all__ = [
    "COMPACT_SLACK",
    "RESCAN_YIELD_EVERY",
    "TICKS_PER_RUN",
    "DueIndex",
    "DueKind",
    "StateEntries",
    "due_kind",
]


class StateEntries(Protocol):
    """Anything listing ``(partition, key, state)`` entries, like ``ChangelogTable``."""

    def items(self) -> Iterable[tuple[int, bytes, ConversationState]]: ...


TICKS_PER_RUN = 2_000
"""Most timer ticks one run of the timer sends, so that a backlog (every ended conversation
due for pruning after an upgrade or a long stop) is spread over several runs instead of
holding the event loop."""

RESCAN_YIELD_EVERY = 1_000
"""States :meth:`DueIndex.rescan` looks at between two yields to the event loop."""

COMPACT_SLACK = 1_024
"""A heap is rebuilt from its live entries once it holds more than twice their number plus
this many entries (stale ones left behind by updates, re-arms and deletions)."""


class DueKind(IntEnum):
    """Why a conversation is due: the timer serves every due ``LIVE`` tick before any prune."""

    LIVE = 0
    """A pending turn's LLM deadline (re-issue) or an open, active or handed-off session's
    inactivity timeout."""
    PRUNE = 1
    """An ended conversation whose retention (``ended_retention_s``) runs out."""


def due_kind(state: ConversationState) -> DueKind:
    """The kind of the time :func:`processors.conversation.next_due_at` gives for ``state``.

    ``next_due_at`` returns the LLM deadline while a turn is pending, else the prune time of an
    ended conversation, else the inactivity timeout: so the time is a prune exactly when
    nothing is pending and the status is ended (closed or timed out).
    """
    if state.pending is None and state.status in ENDED:
        return DueKind.PRUNE
    return DueKind.LIVE


_Entry = tuple[float, str, str, DueKind]
"""``(due_at, tenant, conversation_id, kind)`` of one key; ``due_at`` in POSIX seconds."""

_Heap = list[tuple[float, bytes]]
"""A min-heap of ``(due_at, key)``; an item is live only while the key's entry has that time
and the heap's kind."""


class DueIndex:
    """When each conversation next needs a timer tick (LLM deadline, inactivity timeout, or
    pruning of an ended conversation).

    Kept up to date from every batch the stage commits (:meth:`update`), so a timer run looks
    at the heads of two heaps instead of every stored state. The whole table is rescanned
    (:meth:`rescan`, cooperatively) after its partitions changed (states restored from the
    changelog after a restart or a rebalance, partitions dropped), and as a safety net at the
    latest every ``rescan_s`` seconds.

    Shapes: ``_due`` maps ``key -> (due_at, tenant, conversation_id, kind)`` and is
    authoritative; ``_heaps[kind]`` is a min-heap of ``(due_at, key)`` with lazy deletion (an
    item is skipped when the key's entry is gone or has another time or kind). Each heap is
    rebuilt from its live items when it grows past ``2 * live + COMPACT_SLACK`` items, so its
    size stays within about twice the number of keys of that kind. Due times are kept as POSIX
    seconds (floats compare several times faster than aware datetimes in the heaps); the
    arguments are aware datetimes, durations are in seconds.
    """

    def __init__(self, cfg: ConversationConfig, rescan_s: float) -> None:
        self.cfg = cfg
        self.rescan_s = rescan_s
        self._due: dict[bytes, _Entry] = {}
        self._heaps: tuple[_Heap, _Heap] = ([], [])
        self._counts = [0, 0]  # keys of each kind in _due
        self._scanned_at: datetime | None = None
        self._generation = 0  # bumped by invalidate(), so a rescan running meanwhile is redone
        self._touched: set[bytes] | None = None  # keys changed while a rescan runs

    def __len__(self) -> int:
        """Keys with a due time."""
        return len(self._due)

    def heap_sizes(self) -> tuple[int, int]:
        """Items in the live and the prune heap, stale ones included."""
        return len(self._heaps[DueKind.LIVE]), len(self._heaps[DueKind.PRUNE])

    def update(self, key: bytes, state: ConversationState | None) -> None:
        """Record the next due time of ``key`` (or forget it when nothing is due or the state
        was deleted, ``state`` None). O(log n); an unchanged due time pushes nothing."""
        due = None if state is None else next_due_at(state, self.cfg)
        if self._touched is not None:
            self._touched.add(key)  # a rescan running now must not bring back its older view
        if state is None or due is None:
            self._remove(key)
        else:
            entry = (due.timestamp(), state.tenant, state.conversation_id, due_kind(state))
            self._set(key, entry)

    def invalidate(self) -> None:
        """Rebuild at the next ``rescan`` (the table's partitions changed); a rescan running
        now still applies what it found, and the next call scans again."""
        self._scanned_at = None
        self._generation += 1

    async def rescan(self, table: StateEntries, now: datetime) -> None:
        """Rebuild from the table when invalidated or when the last scan is ``rescan_s`` old.

        O(n log n) for n states, yielding to the event loop every ``RESCAN_YIELD_EVERY``
        states, so other tasks (batches, LLM calls, deliveries) keep running. The new dict and
        heaps are built aside and swapped in at the end; keys updated (or taken) while the
        scan ran keep the index's own, fresher entry. A second call while one runs returns at
        once.
        """
        if self._touched is not None:
            return
        if (
            self._scanned_at is not None
            and (now - self._scanned_at).total_seconds() < self.rescan_s
        ):
            return
        generation = self._generation
        touched: set[bytes] = set()
        self._touched = touched
        try:
            due: dict[bytes, _Entry] = {}
            heaps: tuple[_Heap, _Heap] = ([], [])
            counts = [0, 0]
            cfg = self.cfg
            for number, (_, key, state) in enumerate(table.items()):
                if number % RESCAN_YIELD_EVERY == RESCAN_YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                at = next_due_at(state, cfg)
                old = due.pop(key, None)  # a key listed twice: the last one wins
                if old is not None:
                    counts[old[3]] -= 1
                if at is None:
                    continue
                kind = due_kind(state)
                at_s = at.timestamp()
                due[key] = (at_s, state.tenant, state.conversation_id, kind)
                counts[kind] += 1
                heapq.heappush(heaps[kind], (at_s, key))
        finally:
            self._touched = None
        for key in touched:  # changed during the scan: the index's entry is the fresher one
            old = due.pop(key, None)
            if old is not None:
                counts[old[3]] -= 1
            current = self._due.get(key)
            if current is not None:
                due[key] = current
                counts[current[3]] += 1
                heapq.heappush(heaps[current[3]], (current[0], key))
        self._due = due
        self._heaps = heaps
        self._counts = counts
        for kind in DueKind:
            self._compact_if_needed(kind)
        if self._generation == generation:
            self._scanned_at = now

    def take_due(
        self, now: datetime, retry_s: float, limit: int | None = None
    ) -> list[tuple[bytes, str, str]]:
        """(key, tenant, conversation_id) of at most ``limit`` conversations due at ``now``.

        Live ticks (LLM deadlines, inactivity timeouts) come first, earliest due first; prunes
        fill the rest of ``limit``, earliest due first. A backlog (say every ended
        conversation due for pruning after a long stop) therefore drains ``limit`` per call,
        oldest first, and never delays a re-issue or a timeout. Each key returned is re-armed
        at ``now + retry_s``: asked again after ``retry_s`` unless a commit updates it first
        (the tick's own processing normally does).

        O((k + s) log n) for k keys returned and s stale heap items passed on the way; nothing
        due costs O(1).
        """
        now_s = now.timestamp()
        later = now_s + retry_s
        budget = len(self._due) if limit is None else limit
        taken: list[tuple[bytes, str, str]] = []
        rearmed: list[tuple[DueKind, bytes]] = []
        seen: set[bytes] = set()  # a key can have two equal items (updated A -> B -> A)
        for kind in DueKind:
            heap = self._heaps[kind]
            while heap and len(taken) < budget and heap[0][0] <= now_s:
                at, key = heapq.heappop(heap)
                entry = self._due.get(key)
                if entry is None or entry[0] != at or entry[3] != kind or key in seen:
                    continue  # stale: updated, re-armed or deleted since it was pushed
                _, tenant, conversation_id, _ = entry
                seen.add(key)
                taken.append((key, tenant, conversation_id))
                self._due[key] = (later, tenant, conversation_id, kind)
                rearmed.append((kind, key))
        touched = self._touched
        for kind, key in rearmed:  # pushed after the pops: retry_s 0 must not loop
            heapq.heappush(self._heaps[kind], (later, key))
            if touched is not None:
                touched.add(key)
        for kind in DueKind:
            self._compact_if_needed(kind)
        return taken

    def _set(self, key: bytes, entry: _Entry) -> None:
        old = self._due.get(key)
        if old is not None:
            if old[0] == entry[0] and old[3] == entry[3]:
                self._due[key] = entry  # same time and kind: the heap item still stands
                return
            self._counts[old[3]] -= 1
        self._due[key] = entry
        self._counts[entry[3]] += 1
        heapq.heappush(self._heaps[entry[3]], (entry[0], key))
        self._compact_if_needed(entry[3])

    def _remove(self, key: bytes) -> None:
        old = self._due.pop(key, None)
        if old is not None:
            self._counts[old[3]] -= 1  # its heap item goes stale

    def _compact_if_needed(self, kind: DueKind) -> None:
        """Rebuild a heap grown past ``2 * live + COMPACT_SLACK`` items from the dict, dropping
        its stale items. O(n) for n keys (about 80 ms for 200,000), at most once per
        ``live + COMPACT_SLACK`` pushes, so O(1) amortized; the periodic rescan rebuilds both
        heaps anyway, so this only runs when that many pushes come within one ``rescan_s``."""
        heap = self._heaps[kind]
        if len(heap) <= 2 * self._counts[kind] + COMPACT_SLACK:
            return
        heap[:] = [(entry[0], key) for key, entry in self._due.items() if entry[3] == kind]
        heapq.heapify(heap)
