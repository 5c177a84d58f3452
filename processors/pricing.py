"""The USD cost of one LLM call from its token counts and the configured per-model prices."""

from __future__ import annotations

from collections.abc import Mapping

from processors.config import ModelPrice

__all__ = ["VERSION_SEPARATORS", "cost_usd", "price_for"]

VERSION_SEPARATORS = frozenset("-:@")
"""Characters that may follow a price's name in a longer model name (see :func:`price_for`)."""


def _is_prefix_at_boundary(name: str, model: str) -> bool:
    """Whether ``name`` begins ``model`` and ends at a version separator of it."""
    if not name or len(name) >= len(model) or not model.startswith(name):
        return False
    return name[-1] in VERSION_SEPARATORS or model[len(name)] in VERSION_SEPARATORS


def price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """Return the price configured for ``model``, or None when none applies.

    An exact (case-sensitive) name wins. Otherwise the longest configured name that is a
    prefix of ``model`` ending at a version separator (``-``, ``:`` or ``@``, in ``model`` or
    as the name's last character): ``"gpt-4o"`` prices ``"gpt-4o-2024-08-06"`` (OpenAI's dated
    snapshots), ``"llama3"`` prices ``"llama3:8b"`` (Ollama tags), ``"claude-3@"`` prices
    ``"claude-3@20240229"``. The boundary keeps ``"gpt-4"`` from pricing ``"gpt-4o-mini"``, a
    different and cheaper model; configure ``"gpt-4o-mini"`` or ``"gpt-4o"`` for that.

    Args:
        model: The model name an engine reported (``LLMResponse.model``).
        prices: ``LLMConfig.prices``: model name or prefix to price.

    Returns:
        The matching price, or None.
    """
    exact = prices.get(model)
    if exact is not None:
        return exact
    candidates = [name for name in prices if _is_prefix_at_boundary(name, model)]
    if not candidates:
        return None
    return prices[max(candidates, key=len)]


def cost_usd(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    prices: Mapping[str, ModelPrice],
) -> float:
    """Return the cost of one call in USD, rounded to 1e-9 (nano-dollars).

    ``prompt_tokens / 1000 * prompt_per_1k + completion_tokens / 1000 * completion_per_1k``
    with the price :func:`price_for` picks; a model without a price costs 0.0.

    Args:
        model: The model name the engine reported.
        prompt_tokens: Tokens of the prompt (>= 0).
        completion_tokens: Tokens of the completion (>= 0).
        prices: ``LLMConfig.prices`` (USD per 1,000 tokens).

    Returns:
        The cost in USD, >= 0.

    Raises:
        ValueError: A token count is negative.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError(
            f"token counts must be >= 0, got prompt_tokens={prompt_tokens}, "
            f"completion_tokens={completion_tokens}"
        )
    price = price_for(model, prices)
    if price is None:
        return 0.0
    cost = (
        prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    ) / 1000
    return round(cost, 9)
