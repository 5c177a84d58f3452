"""A bounded pool of concurrent calls in which a finished call starts the next waiting one.

The LLM stage runs up to ``llm.max_in_flight`` engine calls at once. A plain semaphore hands a
freed slot back to whoever waits on it, which runs only after the event loop worked through
everything else that became ready — with hundreds of calls completing together, the new calls
then start together and end together again, and each burst delays its own last calls by its
whole processing time. Here the task of a finished call takes the next waiting item itself,
in the same step, so calls start right after their predecessors and spread out over time.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["CallPool"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class CallPool(Generic[T]):
    """Run ``call(item)`` for submitted items, at most ``limit`` at once.

    Args:
        limit: most calls running at once (>= 1).
        call: the work for one item. An exception it raises is logged and the pool goes on
            (the caller's ``call`` should handle its own failures).
        waiting_max: most items kept waiting in memory while every slot is busy; ``submit``
            blocks beyond that (backpressure). Default ``max(16, limit // 4)``.
        on_busy: called with the number of running calls whenever it changes (a gauge).

    Raises:
        ValueError: ``limit`` or ``waiting_max`` < 1.
    """

    def __init__(
        self,
        limit: int,
        call: Callable[[T], Awaitable[None]],
        *,
        waiting_max: int | None = None,
        on_busy: Callable[[int], None] | None = None,
    ) -> None:
        self.limit = limit
        self.waiting_max = waiting_max if waiting_max is not None else max(16, limit // 4)
        if limit < 1 or self.waiting_max < 1:
            raise ValueError(f"limit and waiting_max must be >= 1, got {limit}, {waiting_max}")
        self.call = call
        self.tasks: set[asyncio.Task[None]] = set()
        """The pool's running tasks."""
        self.on_busy = on_busy
        self._waiting: collections.deque[T] = collections.deque()
        self._room = asyncio.Event()
        self._busy = 0

    @property
    def busy(self) -> int:
        """Calls running now."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Items waiting for a slot."""
        return len(self._waiting)

    async def submit(self, item: T) -> None:
        """Start ``item`` now if a slot is free, else queue it; wait first while ``waiting_max``
        items are already queued and every slot is busy.

        Returns once the item runs or waits (not when its call finished).
        """
        while self._busy >= self.limit and len(self._waiting) >= self.waiting_max:
            self._room.clear()
            await self._room.wait()
        if self._busy < self.limit:
            self._set_busy(self._busy + 1)
            # A fresh context: what the call sends is not part of the submitter's batch.
            task = asyncio.get_running_loop().create_task(
                self._run(item), context=contextvars.Context()
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self._waiting.append(item)

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` seconds for the running calls (they take the waiting items
        in turn), then cancel what still runs; return how many calls and waiting items were
        left unfinished."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
        left = [task for task in self.tasks if not task.done()]
        waiting = len(self._waiting)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)
        return len(left) + waiting

    def _set_busy(self, busy: int) -> None:
        self._busy = busy
        if self.on_busy is not None:
            self.on_busy(busy)

    async def _run(self, item: T) -> None:
        current: T | None = item
        try:
            while current is not None:
                try:
                    await self.call(current)
                except Exception:  # the pool must keep going
                    log.exception("a pooled call failed")
                # The next waiting item, in this same step: a task never stops while items
                # wait, so nothing waits with a slot free.
                current = self._waiting.popleft() if self._waiting else None
                self._room.set()
        finally:
            self._set_busy(self._busy - 1)
            self._room.set()
