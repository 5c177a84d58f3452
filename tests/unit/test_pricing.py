"""Unit tests of processors.pricing: per-model price lookup and call cost."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.config import ModelPrice
from processors.pricing import cost_usd, price_for

GPT_4O = ModelPrice(prompt_per_1k=0.0025, completion_per_1k=0.01)
GPT_4O_MINI = ModelPrice(prompt_per_1k=0.00015, completion_per_1k=0.0006)
GPT_4 = ModelPrice(prompt_per_1k=0.03, completion_per_1k=0.06)
PRICES = {"gpt-4o": GPT_4O, "gpt-4o-mini": GPT_4O_MINI, "gpt-4": GPT_4}


def test_cost_is_tokens_over_1000_times_price_per_1k() -> None:
    assert cost_usd("gpt-4o", 1000, 500, PRICES) == pytest.approx(0.0025 + 0.005)
    assert cost_usd("gpt-4", 2000, 0, PRICES) == pytest.approx(0.06)


def test_unknown_model_costs_nothing() -> None:
    assert cost_usd("local-kb", 10_000, 10_000, PRICES) == 0.0
    assert cost_usd("gpt-4o", 10, 10, {}) == 0.0


def test_exact_name_wins_over_a_prefix() -> None:
    assert price_for("gpt-4o-mini", PRICES) is GPT_4O_MINI


def test_dated_snapshot_uses_the_longest_matching_prefix() -> None:
    assert price_for("gpt-4o-2024-08-06", PRICES) is GPT_4O
    assert price_for("gpt-4o-mini-2024-07-18", PRICES) is GPT_4O_MINI
    assert cost_usd("gpt-4o-2024-08-06", 1000, 1000, PRICES) == pytest.approx(0.0125)


def test_prefix_must_end_at_a_version_separator() -> None:
    assert price_for("gpt-4o", {"gpt-4": GPT_4}) is None
    assert price_for("gpt-4-0613", {"gpt-4": GPT_4}) is GPT_4
    assert price_for("llama3:8b", {"llama3": GPT_4}) is GPT_4
    assert price_for("claude-3@20240229", {"claude-3@": GPT_4}) is GPT_4
    assert price_for("claude-3-5-sonnet@20240620", {"claude-3-5-sonnet": GPT_4}) is GPT_4
    assert price_for("claude-3-5-sonnet-20241022", {"claude-3-5-sonnet": GPT_4}) is GPT_4


@pytest.mark.parametrize(
    ("model", "configured"),
    [
        ("gpt-4o-mini", "gpt-4o"),
        ("gpt-4o-audio-preview", "gpt-4o"),
        ("gpt-4-turbo", "gpt-4"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o"),
        ("gpt-4-1106-preview", "gpt-4"),
    ],
)
def test_a_sibling_model_is_not_priced_as_the_model_it_starts_with(
    model: str, configured: str
) -> None:
    assert price_for(model, {configured: GPT_4O}) is None
    assert cost_usd(model, 1000, 1000, {configured: GPT_4O}) == 0.0


def test_a_name_ending_in_a_separator_is_an_explicit_prefix() -> None:
    assert price_for("gpt-4o-mini", {"gpt-4o-": GPT_4O}) is GPT_4O


def test_model_names_are_case_sensitive() -> None:
    assert price_for("GPT-4o", PRICES) is None


def test_cost_is_rounded_to_nano_dollars() -> None:
    prices = {"m": ModelPrice(prompt_per_1k=0.000_000_1234, completion_per_1k=0.0)}
    assert cost_usd("m", 10, 0, prices) == 0.000_000_001
    assert cost_usd("m", 1, 0, prices) == 0.0


def test_negative_token_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_tokens=-1, completion_tokens=0"):
        cost_usd("gpt-4o", -1, 0, PRICES)


_tokens = st.integers(min_value=0, max_value=2_000_000)
_price = st.builds(
    ModelPrice,
    prompt_per_1k=st.floats(min_value=0, max_value=1, allow_nan=False),
    completion_per_1k=st.floats(min_value=0, max_value=1, allow_nan=False),
)


@given(_price, _tokens, _tokens, _tokens)
def test_cost_is_non_negative_and_grows_with_tokens(
    price: ModelPrice, prompt: int, completion: int, extra: int
) -> None:
    prices = {"m": price}
    cost = cost_usd("m", prompt, completion, prices)
    assert cost >= 0
    assert cost_usd("m", prompt + extra, completion, prices) >= cost
    assert cost_usd("m", prompt, completion + extra, prices) >= cost
    expected = (prompt * price.prompt_per_1k + completion * price.completion_per_1k) / 1000
    assert cost == pytest.approx(expected, abs=1e-9)


_SNAPSHOTS = st.sampled_from(["-{:%Y-%m-%d}", "-{:%Y%m%d}", "-{:%m%d}", ":{}", "@{}"])


@given(st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31)), _SNAPSHOTS, _tokens)
def test_a_snapshot_of_a_priced_model_costs_what_the_model_costs(
    day: date, suffix: str, n: int
) -> None:
    prices = {"gpt-4o": GPT_4O}
    model = "gpt-4o" + suffix.format(day)
    assert cost_usd(model, n, n, prices) == cost_usd("gpt-4o", n, n, prices)
