"""Token counting of chat prompts and trimming a prompt's history to a context budget.

Counts are estimates unless the optional ``tiktoken`` package is installed *and* can load the
model's encoding. ``tiktoken`` is deliberately not a dependency: it ships no BPE files and
downloads them from ``openaipublic.blob.core.windows.net`` the first time an encoding is used
(tried here: ``tiktoken.encoding_for_model("gpt-4o")`` raises ``requests.ConnectionError``
offline), so on an offline worker it adds a package and a failing network call for no gain,
and it knows nothing of non-OpenAI models (the local engine, Ollama, vLLM). A deployment that
wants exact counts installs it and pre-fills ``TIKTOKEN_CACHE_DIR``; then it is used. The
encoding of each model is looked up once per process; a failure is cached too, so a missing
file costs one attempt, not one per call.

The estimate is ``ceil(len(text) / 4)``: OpenAI's rule of thumb "one token is about 4
characters of English text" ("What are tokens and how to count them", OpenAI help center).
It undercounts text that is not English prose (code, CJK scripts); keep a margin in
``reserve_tokens``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol, cast

from schemas.models import ChatMessage, Role

__all__ = [
    "CHARS_PER_TOKEN",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "count_message_tokens",
    "count_tokens",
    "trim_to_budget",
]

CHARS_PER_TOKEN = 4
"""Characters per token of the estimate (OpenAI help center rule of thumb)."""

TOKENS_PER_MESSAGE = 4
"""Framing tokens per chat message: ``<|start|>{role}\\n{content}<|end|>\\n``.

OpenAI cookbook "How to count tokens with tiktoken": 3 framing tokens per message for
current chat models plus the role name (one token for system/user/assistant); the cookbook's
figure for ``gpt-3.5-turbo-0301`` is 4. We use 4 for every model.
"""

REPLY_PRIMING_TOKENS = 3
"""Tokens priming the reply (``<|start|>assistant<|message|>``), once per prompt (same source)."""


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@lru_cache(maxsize=64)
def _encoding_for(model: str) -> _Encoding | None:
    """Return tiktoken's encoding of ``model``, or None (no tiktoken, unknown model, no file)."""
    if not model:
        return None
    try:
        tiktoken = importlib.import_module("tiktoken")
        return cast(_Encoding, tiktoken.encoding_for_model(model))
    except Exception:  # ImportError, KeyError (unknown model), network/IO errors: estimate.
        return None


def count_tokens(text: str, model: str) -> int:
    """Return the number of tokens of ``text`` for ``model`` (exact or estimated).

    Args:
        text: Any text; the empty string is 0 tokens.
        model: The model name (e.g. ``"gpt-4o-mini"``); unknown or empty names are estimated.

    Returns:
        tiktoken's count when its encoding for ``model`` loads (see the module docstring),
        else ``ceil(len(text) / 4)``.
    """
    encoding = _encoding_for(model)
    if encoding is not None:
        return len(encoding.encode_ordinary(text))
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _message_tokens(message: ChatMessage, model: str) -> int:
    return TOKENS_PER_MESSAGE + count_tokens(message.content, model)


def count_message_tokens(messages: Sequence[ChatMessage], model: str) -> int:
    """Return the prompt tokens of a chat call: each message's content plus framing.

    ``sum(TOKENS_PER_MESSAGE + count_tokens(m.content)) + REPLY_PRIMING_TOKENS`` — the OpenAI
    cookbook's "How to count tokens with tiktoken" formula, with 4 tokens per message.

    Args:
        messages: The messages of one call, in any order.
        model: The model name, as for :func:`count_tokens`.

    Returns:
        The token count; ``REPLY_PRIMING_TOKENS`` for no messages.
    """
    return REPLY_PRIMING_TOKENS + sum(_message_tokens(m, model) for m in messages)


def _keep_suffix_within(content: str, max_tokens: int, model: str) -> str:
    """Return the longest end of ``content`` that is at most ``max_tokens`` tokens.

    Binary search over the suffix length; only lengths whose count was checked are kept, so
    the result fits even when a tokenizer's count is not monotonic in the length.
    """
    if max_tokens <= 0:
        return ""
    low, high = 0, len(content)  # suffix length ``low`` fits; ``high`` is the largest to try
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(content[len(content) - mid :], model) <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return content[len(content) - low :]


def trim_to_budget(
    messages: list[ChatMessage],
    *,
    budget_tokens: int,
    reserve_tokens: int,
    model: str,
) -> list[ChatMessage]:
    """Return ``messages`` cut to fit ``budget_tokens - reserve_tokens`` prompt tokens.

    The first system message and the last user message are always kept; every other message
    is history, dropped oldest first until :func:`count_message_tokens` fits the limit, so the
    history kept is a suffix of the history given and the order is unchanged. When the two
    kept messages alone exceed the limit, all history goes and the last user message's content
    is cut from its start, keeping its end (the question usually closes the message) — no
    ellipsis is added. When even an empty user message does not fit (a system prompt larger
    than the context), its content is emptied and the result still exceeds the limit; no
    message is ever cut from the system prompt.

    Args:
        messages: The prompt, oldest first (as ``processors.prompt.build_messages`` builds it).
        budget_tokens: The model's prompt budget (``EngineConfig.context_tokens``).
        reserve_tokens: Tokens kept free, e.g. for the completion (``EngineConfig.max_tokens``).
        model: The model name, for :func:`count_tokens`.

    Returns:
        A new list; ``messages`` itself is not changed.

    Raises:
        ValueError: ``budget_tokens`` or ``reserve_tokens`` is negative.
    """
    if budget_tokens < 0 or reserve_tokens < 0:
        raise ValueError(
            f"budget_tokens and reserve_tokens must be >= 0, got {budget_tokens} and "
            f"{reserve_tokens}"
        )
    limit = budget_tokens - reserve_tokens
    system_at = next((i for i, m in enumerate(messages) if m.role is Role.SYSTEM), None)
    user_at = next(
        (i for i in reversed(range(len(messages))) if messages[i].role is Role.USER), None
    )
    pinned = {i for i in (system_at, user_at) if i is not None}
    sizes = [_message_tokens(m, model) for m in messages]
    total = REPLY_PRIMING_TOKENS + sum(sizes)
    dropped: set[int] = set()
    for i in range(len(messages)):
        if total <= limit:
            break
        if i not in pinned:
            dropped.add(i)
            total -= sizes[i]
    kept = {i: m for i, m in enumerate(messages) if i not in dropped}
    if total > limit and user_at is not None:
        room = limit - (total - sizes[user_at]) - TOKENS_PER_MESSAGE
        content = _keep_suffix_within(messages[user_at].content, room, model)
        kept[user_at] = ChatMessage(role=Role.USER, content=content)
    return list(kept.values())
