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

The estimate (:func:`estimate_tokens`) weighs each character by the length of its UTF-8
encoding, as the byte-level BPE tokenizers of OpenAI's models (tiktoken) split UTF-8 bytes,
not characters:

- ASCII (1 byte): a quarter of a token, OpenAI's rule of thumb "one token is about 4
  characters of English text" ("What are tokens and how to count them", OpenAI help center).
  ASCII text alone is therefore ``ceil(len(text) / 4)``.
- Other characters of 2 bytes (U+0080..U+07FF: accented Latin, Greek, Cyrillic, Hebrew,
  Arabic...): half a token.
- Characters of 3 or 4 bytes (U+0800 and above: CJK ideographs, kana, hangul, Thai,
  Devanagari, emoji...): one token each. A byte-level BPE learnt mostly from English merges
  few of these bytes, so a CJK character is taken as about one token for OpenAI's models
  (an assumption, not measured here: tiktoken's encodings cannot be loaded offline);
  DeepSeek documents 0.6 token per Chinese character for its own tokenizer
  (api-docs.deepseek.com, "Token & Token Usage"). ``len / 4`` counted a quarter token per
  character: a Chinese prompt the trimming believed within budget could be up to four times
  over it.

The weights lean high on purpose: an over-count trims a little more history than needed, an
under-count gets the call refused (``context_length_exceeded``). It still undercounts code and
the scripts that take several tokens per character; keep a margin in ``reserve_tokens``.
"""

from __future__ import annotations

import importlib
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
    "estimate_tokens",
    "shed_history",
    "trim_to_budget",
]

CHARS_PER_TOKEN = 4
"""ASCII characters per token of the estimate (OpenAI help center rule of thumb)."""

_QUARTERS_PER_TOKEN = 4
"""The estimate counts quarter tokens: 1 per ASCII character, 2 per other 2-byte character,
4 per wider one (see the module docstring)."""

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


_ALL_BUT_E0_EF = bytes(b for b in range(256) if not 0xE0 <= b <= 0xEF)
"""Every byte but the lead bytes of 3-byte UTF-8 sequences: ``bytes.translate`` deleting these
keeps one byte per 3-byte character."""


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` without a tokenizer (weights: see the module docstring).

    Computed on the UTF-8 encoding, in C: each character's quarters equal its byte count (1,
    2, 3 or 4), plus one for a 3-byte character (lead byte 0xE0..0xEF), so that 3- and 4-byte
    characters both weigh 4. Lone surrogates (``"surrogatepass"``) encode as 3 bytes: 4
    quarters, as any character above U+07FF.

    Returns:
        ``ceil((ascii + 2 * two_byte + 4 * wider) / 4)`` over the characters of ``text``:
        ``ceil(len(text) / 4)`` for ASCII, one per CJK character; 0 for the empty string.
    """
    if text.isascii():
        return -(-len(text) // CHARS_PER_TOKEN)
    encoded = text.encode("utf-8", "surrogatepass")
    quarters = len(encoded) + len(encoded.translate(None, _ALL_BUT_E0_EF))
    return -(-quarters // _QUARTERS_PER_TOKEN)


def count_tokens(text: str, model: str) -> int:
    """Return the number of tokens of ``text`` for ``model`` (exact or estimated).

    Args:
        text: Any text; the empty string is 0 tokens.
        model: The model name (e.g. ``"gpt-4o-mini"``); unknown or empty names are estimated.

    Returns:
        tiktoken's count when its encoding for ``model`` loads (see the module docstring),
        else :func:`estimate_tokens`.
    """
    encoding = _encoding_for(model)
    if encoding is not None:
        return len(encoding.encode_ordinary(text))
    if text.isascii():  # the common case, inline: this runs for every message of every turn
        return -(-len(text) // CHARS_PER_TOKEN)
    return estimate_tokens(text)


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
    sizes = [TOKENS_PER_MESSAGE + count_tokens(m.content, model) for m in messages]
    total = REPLY_PRIMING_TOKENS + sum(sizes)
    if total <= limit:  # the common case: the prompt fits as it is
        return list(messages)
    kept, total, user_at = _drop_oldest_history(messages, sizes, total, limit)
    if total > limit and user_at is not None:
        room = limit - (total - sizes[user_at]) - TOKENS_PER_MESSAGE
        content = _keep_suffix_within(messages[user_at].content, room, model)
        kept[user_at] = ChatMessage(role=Role.USER, content=content)
    return list(kept.values())


def shed_history(
    messages: list[ChatMessage], *, limit_tokens: int, model: str
) -> list[ChatMessage]:
    """Return ``messages`` without their oldest history, to fit ``limit_tokens`` if history can.

    The first system message and the last user message are kept whole; every other message
    is history, dropped oldest first until :func:`count_message_tokens` is at most
    ``limit_tokens`` or no history is left. Unlike :func:`trim_to_budget` no content is cut,
    so the result may still exceed the limit.

    Args:
        messages: The prompt, oldest first.
        limit_tokens: Prompt tokens to fit in (may be below what the kept messages need).
        model: The model name, for :func:`count_tokens`.

    Returns:
        A new list (``messages`` unchanged): the kept messages in their order.
    """
    sizes = [TOKENS_PER_MESSAGE + count_tokens(m.content, model) for m in messages]
    total = REPLY_PRIMING_TOKENS + sum(sizes)
    kept, _, _ = _drop_oldest_history(messages, sizes, total, limit_tokens)
    return list(kept.values())


def _drop_oldest_history(
    messages: list[ChatMessage], sizes: list[int], total: int, limit: int
) -> tuple[dict[int, ChatMessage], int, int | None]:
    """Drop history (all but the first system and the last user message), oldest first,
    until the prompt counts at most ``limit`` tokens or no history is left.

    Args:
        messages: The prompt.
        sizes: The tokens of each message, framing included (``_message_tokens``).
        total: The prompt's tokens: ``REPLY_PRIMING_TOKENS + sum(sizes)``.
        limit: Tokens to fit in.

    Returns:
        ``(kept messages by index, their prompt token count, index of the last user message
        or None)``.
    """
    system_at = next((i for i, m in enumerate(messages) if m.role is Role.SYSTEM), None)
    user_at = next(
        (i for i in reversed(range(len(messages))) if messages[i].role is Role.USER), None
    )
    pinned = {i for i in (system_at, user_at) if i is not None}
    dropped: set[int] = set()
    for i in range(len(messages)):
        if total <= limit:
            break
        if i not in pinned:
            dropped.add(i)
            total -= sizes[i]
    kept = {i: m for i, m in enumerate(messages) if i not in dropped}
    return kept, total, user_at
