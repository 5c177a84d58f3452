"""The USD cost of one LLM call from its token counts and the configured per-model prices."""

from __future__ import annotations

import re
from collections.abc import Mapping

from processors.config import ModelPrice

__all__ = ["VERSION_SEPARATORS", "cost_usd", "price_for"]

VERSION_SEPARATORS = frozenset("-:@")
"""Characters that may follow a price's name in a longer model name (see :func:`price_for`)."""

_DASH_VERSION = re.compile(r"-(?:\d{4}|\d{8}|\d{4}-\d{2}-\d{2})")
"""What may follow a name at a ``-``: a dated or numbered snapshot (``-2024-08-06``,
``-20241022``, ``-0613``), not the rest of another model's name (``-mini``, ``-turbo``)."""


def _is_version_of(name: str, model: str) -> bool:
    """Whether ``model`` is ``name`` plus a version suffix (see :func:`price_for`)."""
    if not name or len(name) >= len(model) or not model.startswith(name):
        return False
    if name[-1] in VERSION_SEPARATORS:  # an explicit prefix: "claude-3@", "gpt-4o-"
        return True
    rest = model[len(name) :]
    if rest[0] in ":@":  # an Ollama tag or a Vertex AI version of the same model
        return True
    return _DASH_VERSION.fullmatch(rest) is not None


def price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """Return the price configured for ``model``, or None when none applies.

    An exact (case-sensitive) name wins. Otherwise the longest configured name of which
    ``model`` is a version: the name followed by ``:`` or ``@`` and anything (``"llama3"``
    prices ``"llama3:8b"``, an Ollama tag; ``"claude-3-5-sonnet"`` prices
    ``"claude-3-5-sonnet@20240620"``, a Vertex AI version), or by ``-`` and a snapshot date or
    number (``"gpt-4o"`` prices ``"gpt-4o-2024-08-06"`` and ``"gpt-4-0613"``'s ``"gpt-4"``,
    OpenAI's snapshots; ``"claude-3-5-sonnet"`` prices ``"claude-3-5-sonnet-20241022"``).
    ``"gpt-4o"`` does not price ``"gpt-4o-mini"``, nor ``"gpt-4"`` ``"gpt-4-turbo"``: those
    are other models at other prices. A name ending in a separator (``"gpt-4o-"``) is an
    explicit prefix and prices every model that starts with it.

    Args:
        model: The model name an engine reported (``LLMResponse.model``).
        prices: ``LLMConfig.prices``: model name or prefix to price.

    Returns:
        The matching price, or None (the call then costs 0).
    """
    exact = prices.get(model)
    if exact is not None:
        return exact
    candidates = [name for name in prices if _is_version_of(name, model)]
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
