"""Tests of the shared provider rate limiter (budgets per second keep them fast)."""

from __future__ import annotations

import asyncio
import math

import pytest

from connectors.llm.ratelimit import ProviderRateLimiter
from processors.config import EngineConfig


class FakeTime:
    """A monotonic clock that only moves when a caller sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)  # let other tasks run (and read the clock) before time moves
        self.now += seconds


class CountingSleep:
    """The real asyncio.sleep, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, seconds: float) -> None:
        self.calls += 1
        await asyncio.sleep(seconds)


async def test_calls_within_the_request_budget_do_not_wait() -> None:
    limiter = ProviderRateLimiter(5, None, per="second")

    waits = [await limiter.acquire(0) for _ in range(5)]

    assert max(waits) < 0.05


async def test_call_over_the_request_budget_waits_until_the_window_frees() -> None:
    limiter = ProviderRateLimiter(3, None, per="second")
    for _ in range(3):
        await limiter.acquire(0)

    waited = await limiter.acquire(0)

    assert 0.8 <= waited < 1.5


async def test_waiting_sleeps_until_the_reset_time_instead_of_spinning() -> None:
    sleep = CountingSleep()
    limiter = ProviderRateLimiter(1, None, per="second", sleep=sleep)
    await limiter.acquire(0)

    waited = await limiter.acquire(0)

    assert waited >= 0.8
    assert 1 <= sleep.calls <= 3


async def test_token_budget_makes_the_call_that_would_exceed_it_wait() -> None:
    limiter = ProviderRateLimiter(None, 100, per="second")

    first = await limiter.acquire(60)
    second = await limiter.acquire(60)

    assert first < 0.05
    assert 0.8 <= second < 1.5


async def test_call_larger_than_the_token_budget_waits_for_an_empty_window_not_forever() -> None:
    limiter = ProviderRateLimiter(None, 100, per="second")

    alone = await asyncio.wait_for(limiter.acquire(500), timeout=2)
    after = await asyncio.wait_for(limiter.acquire(1), timeout=3)

    assert alone < 0.05
    assert after >= 0.8


async def test_large_token_budget_counted_in_blocks_is_never_exceeded() -> None:
    limiter = ProviderRateLimiter(None, 25_000, per="second")  # blocks of 3 tokens

    whole = await limiter.acquire(24_990)
    over = await limiter.acquire(20)

    assert whole < 0.05
    assert over >= 0.8


async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = ProviderRateLimiter(1, None, per="second")
    await limiter.acquire(0)
    order: list[str] = []

    async def call(name: str) -> None:
        await limiter.acquire(0)
        order.append(name)

    await asyncio.gather(call("a"), call("b"))

    assert order == ["a", "b"]


async def test_penalize_pauses_every_caller_until_retry_after() -> None:
    time = FakeTime()
    limiter = ProviderRateLimiter(None, None, clock=time.clock, sleep=time.sleep)

    limiter.penalize(2.0)
    waits = await asyncio.gather(limiter.acquire(10), limiter.acquire(10))

    assert list(waits) == [2.0, 2.0]
    assert time.now == 102.0
    assert limiter.pause_remaining_s == 0.0


async def test_shorter_penalty_does_not_shorten_a_pause_in_force() -> None:
    time = FakeTime()
    limiter = ProviderRateLimiter(None, None, clock=time.clock, sleep=time.sleep)

    limiter.penalize(5.0)
    limiter.penalize(1.0)

    assert limiter.pause_remaining_s == 5.0
    assert await limiter.acquire(1) == 5.0


async def test_penalty_during_a_wait_extends_it() -> None:
    limiter = ProviderRateLimiter(None, None)
    limiter.penalize(0.1)
    waiting = asyncio.create_task(limiter.acquire(1))
    await asyncio.sleep(0.05)

    limiter.penalize(0.2)
    waited = await waiting

    assert waited >= 0.24


async def test_limiter_without_budgets_or_penalty_never_waits() -> None:
    time = FakeTime()
    limiter = ProviderRateLimiter(None, None, clock=time.clock, sleep=time.sleep)

    waits = [await limiter.acquire(1_000_000) for _ in range(100)]

    assert waits == [0.0] * 100
    assert time.sleeps == []


def test_negative_penalty_counts_as_none() -> None:
    time = FakeTime()
    limiter = ProviderRateLimiter(None, None, clock=time.clock, sleep=time.sleep)

    limiter.penalize(-3.0)

    assert limiter.pause_remaining_s == 0.0


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_penalty_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        ProviderRateLimiter(None, None).penalize(value)


@pytest.mark.parametrize(("requests", "tokens"), [(0, None), (None, 0), (-1, 10)])
def test_budget_below_one_is_rejected(requests: int | None, tokens: int | None) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        ProviderRateLimiter(requests, tokens)


async def test_negative_token_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="tokens"):
        await ProviderRateLimiter(None, None).acquire(-1)


async def test_from_config_uses_the_engine_budgets_per_minute() -> None:
    limiter = ProviderRateLimiter.from_config(
        EngineConfig(kind="openai", requests_per_minute=2, tokens_per_minute=1000)
    )
    await limiter.acquire(10)
    await limiter.acquire(10)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(10), timeout=0.3)


async def test_tokens_used_beyond_the_estimate_are_charged_to_the_next_call() -> None:
    limiter = ProviderRateLimiter(None, 100, per="second")
    assert await limiter.acquire(10) < 0.05
    limiter.settle(10, 90)  # the provider counted 90 tokens for a call estimated at 10
    assert limiter.debt_tokens == 80

    waited = await limiter.acquire(20)  # 80 owed + 20 > the 90 left of this second's 100

    assert waited >= 0.5
    assert limiter.debt_tokens == 0


async def test_an_over_estimate_is_not_charged_and_settle_without_a_token_budget_is_a_no_op() -> (
    None
):
    limiter = ProviderRateLimiter(None, 100, per="second")
    await limiter.acquire(60)
    limiter.settle(60, 20)
    assert limiter.debt_tokens == 0
    assert await limiter.acquire(40) < 0.05  # 60 + 40 fit: nothing was added

    requests_only = ProviderRateLimiter(5, None, per="second")
    requests_only.settle(1, 10_000)
    assert requests_only.debt_tokens == 0
