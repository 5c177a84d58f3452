"""A provider's request and token budgets, shared by every call: callers wait, never fail."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from processors.config import EngineConfig

__all__ = ["MAX_WINDOW_ENTRIES", "ProviderRateLimiter"]

logger = logging.getLogger(__name__)

MAX_WINDOW_ENTRIES = 10_000
"""Token budgets are counted in blocks so that a window holds at most this many entries."""

_MIN_SLEEP_S = 0.005  # floor of every wait, so a wait computed as ~0 never spins
_ITEMS: dict[str, type[RateLimitItem]] = {
    "second": RateLimitItemPerSecond,
    "minute": RateLimitItemPerMinute,
}


class ProviderRateLimiter:
    """Keeps calls within a provider's requests-per-minute and tokens-per-minute limits.

    Built on the ``limits`` library's *moving window* strategy
    (``limits.aio.strategies.MovingWindowRateLimiter`` over ``limits.aio.storage.MemoryStorage``):
    at any instant, the calls of the last 60 s use at most the budget, so there is no burst of
    twice the limit at a window edge as with a fixed window. The moving window keeps one entry
    per unit, so tokens are counted in blocks of ``ceil(tokens_per_minute /
    MAX_WINDOW_ENTRIES)`` tokens (a call's cost is rounded up, the budget down: never over).

    :meth:`acquire` waits (``asyncio.sleep`` until the window frees, from ``limits``'
    ``get_window_stats`` reset time) and never raises for being over the limit: a slow provider
    slows the stage down (backpressure) instead of failing it. Waiters are served in arrival
    order (FIFO), so a large request is not starved by small ones. :meth:`penalize` pauses every
    caller after a 429, so one ``Retry-After`` slows the whole stage instead of each call
    finding the limit for itself. One limiter is meant to be shared by all calls to a provider.

    A call is counted with its *estimated* tokens when it starts; :meth:`settle` then charges
    what the provider reported beyond the estimate to the next calls (a debt), so a prompt the
    estimate (``processors.tokens.estimate_tokens``) under-counts (e.g. code, or a script of
    several tokens per character) cannot push the provider past its budget. Tokens
    over-estimated are not given back: the ``limits`` moving window has no refund, and counting
    too much only makes the stage a little slower.

    Args:
        requests_per_minute: Request budget, or None for no request limit.
        tokens_per_minute: Token budget (prompt + completion), or None for no token limit.
        clock: Monotonic clock (s) for pauses and the waited time returned.
        sleep: Awaitable sleep (s); tests pass one that advances a fake ``clock``. The windows
            themselves follow ``limits``' wall clock (``time.time``).
        per: Window length, "minute" (default) or "second" (tests: budgets per second).

    Raises:
        ValueError: A budget below 1, or an unknown ``per``.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        per: Literal["minute", "second"] = "minute",
    ) -> None:
        for name, budget in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if budget is not None and budget < 1:
                raise ValueError(f"{name} per {per} must be >= 1 or None, got {budget}")
        if per not in _ITEMS:
            raise ValueError(f"per must be one of {sorted(_ITEMS)}, got {per!r}")
        item = _ITEMS[per]
        self._clock = clock
        self._sleep = sleep
        self._strategy = MovingWindowRateLimiter(MemoryStorage())
        self._requests = (
            item(requests_per_minute, namespace="requests") if requests_per_minute else None
        )
        self._token_block = 1
        self._tokens: RateLimitItem | None = None
        if tokens_per_minute:
            self._token_block = math.ceil(tokens_per_minute / MAX_WINDOW_ENTRIES)
            self._tokens = item(tokens_per_minute // self._token_block, namespace="tokens")
        self._paused_until = -math.inf
        self._debt_tokens = 0
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> ProviderRateLimiter:
        """A limiter with ``cfg.requests_per_minute`` and ``cfg.tokens_per_minute``."""
        return cls(cfg.requests_per_minute, cfg.tokens_per_minute)

    @property
    def pause_remaining_s(self) -> float:
        """Seconds left of the shared pause set by :meth:`penalize` (0 when none)."""
        return max(0.0, self._paused_until - self._clock())

    def penalize(self, retry_after_s: float) -> None:
        """Make every caller wait until ``now + retry_after_s`` (the provider's Retry-After).

        A shorter penalty never shortens a pause already in force.

        Args:
            retry_after_s: Seconds to pause; negative counts as 0.

        Raises:
            ValueError: ``retry_after_s`` is not finite.
        """
        if not math.isfinite(retry_after_s):
            raise ValueError(f"retry_after_s must be finite, got {retry_after_s}")
        until = self._clock() + max(0.0, retry_after_s)
        if until > self._paused_until:
            self._paused_until = until
            logger.info("provider asked for a pause; all calls wait %.3f s", retry_after_s)

    @property
    def debt_tokens(self) -> int:
        """Tokens used beyond the estimates that the next :meth:`acquire` will count."""
        return self._debt_tokens

    def settle(self, estimated: int, actual: int) -> None:
        """Charge a finished call's tokens beyond its estimate to the next calls.

        Args:
            estimated: Tokens the call was counted with by :meth:`acquire`.
            actual: Prompt + completion tokens the provider reported for it.
        """
        if self._tokens is not None and actual > estimated:
            self._debt_tokens += actual - estimated

    def _costs(self, tokens: int) -> list[tuple[RateLimitItem, int]]:
        costs: list[tuple[RateLimitItem, int]] = []
        if self._requests is not None:
            costs.append((self._requests, 1))
        if self._tokens is not None and tokens > 0:
            blocks = math.ceil(tokens / self._token_block)
            if blocks > self._tokens.amount:
                logger.warning(
                    "a call of %d tokens exceeds the whole token budget; it waits for an "
                    "empty window",
                    tokens,
                )
                blocks = self._tokens.amount
            costs.append((self._tokens, blocks))
        return costs

    async def _window_wait(self, costs: list[tuple[RateLimitItem, int]]) -> float:
        """Seconds until every window could take its cost (0 = now), by limits' wall clock."""
        wait = 0.0
        for item, cost in costs:
            if not await self._strategy.test(item, cost=cost):
                stats = await self._strategy.get_window_stats(item)
                wait = max(wait, stats.reset_time - time.time(), _MIN_SLEEP_S)
        return wait

    async def acquire(self, tokens: int) -> float:
        """Wait until one request of ``tokens`` tokens fits the budgets, then count it.

        Args:
            tokens: Estimated prompt + completion tokens of the call (>= 0); the debt of
                earlier calls (:meth:`settle`) is added to it.

        Returns:
            Seconds waited (by ``clock``).

        Raises:
            ValueError: ``tokens`` is negative.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        costs = self._costs(tokens)
        started = self._clock()
        if not costs and self._paused_until <= started:
            return 0.0  # no budget configured and no pause in force: nothing to wait for
        async with self._lock:
            while True:
                pause = self._paused_until - self._clock()
                if pause > 0:
                    await self._sleep(pause)
                    continue
                # The debt is read here, under the lock, and cleared only once counted: a
                # call cancelled while it waits leaves it to the next one.
                owed = self._debt_tokens
                costs = self._costs(tokens + owed)
                wait = await self._window_wait(costs)
                if wait > 0:
                    await self._sleep(wait)
                    continue
                # Under the lock nothing else takes capacity and windows only free up with
                # time, so the hits succeed once the tests passed; if one ever did not, the
                # call waits a little and tries again (counting too much, never too little).
                hits = [await self._strategy.hit(item, cost=cost) for item, cost in costs]
                if all(hits):
                    self._debt_tokens -= owed
                    break
                await self._sleep(_MIN_SLEEP_S)
        waited = self._clock() - started
        if waited > 0:
            logger.debug("rate limiter held a call of %d tokens for %.3f s", tokens, waited)
        return waited
