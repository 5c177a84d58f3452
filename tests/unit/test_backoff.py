"""Unit tests of processors.backoff: full-jitter bounds, the cap and Retry-After."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.backoff import backoff_delay

positive = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(
    attempt=st.integers(min_value=0, max_value=5000),
    initial_s=positive,
    max_s=positive,
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_the_full_jitter_window_for_every_attempt(
    attempt: int, initial_s: float, max_s: float, seed: int
) -> None:
    delay = backoff_delay(attempt, initial_s=initial_s, max_s=max_s, rng=random.Random(seed))
    window = min(max_s, initial_s * 2.0 ** min(attempt, 1023))
    assert 0.0 <= delay <= window
    assert delay <= max_s


@given(
    attempt=st.integers(min_value=0, max_value=100),
    retry_after_s=st.floats(min_value=0, max_value=3600, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_never_shorter_than_retry_after(
    attempt: int, retry_after_s: float, seed: int
) -> None:
    delay = backoff_delay(
        attempt, initial_s=0.5, max_s=30.0, rng=random.Random(seed), retry_after_s=retry_after_s
    )
    assert delay >= retry_after_s
    assert delay <= max(30.0, retry_after_s)


def test_retry_after_longer_than_the_cap_is_used_as_is() -> None:
    delay = backoff_delay(3, initial_s=0.5, max_s=2.0, rng=random.Random(1), retry_after_s=120.0)
    assert delay == 120.0


def test_short_retry_after_leaves_the_jittered_delay_unchanged() -> None:
    plain = backoff_delay(6, initial_s=1.0, max_s=60.0, rng=random.Random(7))
    with_hint = backoff_delay(6, initial_s=1.0, max_s=60.0, rng=random.Random(7), retry_after_s=0.0)
    assert plain > 0.0
    assert with_hint == plain


def test_window_doubles_per_attempt_until_the_cap() -> None:
    rng = random.Random(42)
    for attempt, expected_window in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (40, 30.0)]:
        samples = [backoff_delay(attempt, initial_s=0.5, max_s=30.0, rng=rng) for _ in range(2000)]
        assert max(samples) <= expected_window
        # full jitter spreads over the whole window, not a fixed delay
        assert max(samples) > 0.95 * expected_window
        assert min(samples) < 0.05 * expected_window


def test_same_seed_gives_the_same_schedule() -> None:
    def schedule(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff_delay(a, initial_s=0.1, max_s=10.0, rng=rng) for a in range(10)]

    assert schedule(3) == schedule(3)
    assert schedule(3) != schedule(4)


def test_huge_attempt_numbers_do_not_overflow() -> None:
    delay = backoff_delay(10**6, initial_s=5.0, max_s=30.0, rng=random.Random(0))
    assert 0.0 <= delay <= 30.0


def test_default_rng_is_used_when_none_given() -> None:
    delays = {backoff_delay(5, initial_s=1.0, max_s=30.0) for _ in range(20)}
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize(
    ("attempt", "initial_s", "max_s", "retry_after_s", "message"),
    [
        (-1, 1.0, 2.0, None, "attempt"),
        (0, 0.0, 2.0, None, "initial_s"),
        (0, 1.0, -1.0, None, "max_s"),
        (0, float("nan"), 2.0, None, "initial_s"),
        (0, 1.0, float("inf"), None, "max_s"),
        (0, 1.0, 2.0, float("inf"), "retry_after_s"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(
    attempt: int, initial_s: float, max_s: float, retry_after_s: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        backoff_delay(attempt, initial_s=initial_s, max_s=max_s, retry_after_s=retry_after_s)
