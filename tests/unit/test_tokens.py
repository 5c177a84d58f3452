"""Unit tests of processors.tokens: token estimates, prompt counts and context trimming."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors import tokens
from processors.tokens import (
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    count_message_tokens,
    count_tokens,
    estimate_tokens,
    shed_history,
    trim_to_budget,
)
from schemas.models import ChatMessage, Role

MODEL = "test-model-without-encoding"


@pytest.fixture(autouse=True)
def _fresh_encoding_cache() -> Iterator[None]:
    tokens._encoding_for.cache_clear()
    yield
    tokens._encoding_for.cache_clear()


def sys_msg(content: str) -> ChatMessage:
    return ChatMessage(role=Role.SYSTEM, content=content)


def user(content: str) -> ChatMessage:
    return ChatMessage(role=Role.USER, content=content)


def bot(content: str) -> ChatMessage:
    return ChatMessage(role=Role.ASSISTANT, content=content)


# --- counting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2)])
def test_estimate_is_ceil_of_chars_over_four(text: str, expected: int) -> None:
    assert count_tokens(text, MODEL) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("你好世界", 4),  # CJK ideographs (3 UTF-8 bytes): one token each
        ("こんにちは", 5),  # kana
        ("안녕하세요", 5),  # hangul
        ("привет", 3),  # Cyrillic (2 bytes): half a token each
        ("café", 2),  # 3 ASCII quarters + 2 for "é" = 5 quarters
        ("hi 你好", 3),  # 3 quarters + 8
        ("😀", 1),
    ],
)
def test_the_estimate_counts_wider_characters_as_more_of_a_token(text: str, expected: int) -> None:
    # Before, ceil(len / 4): "你好世界" was 1 token, a quarter of the ~1 per ideograph.
    assert count_tokens(text, MODEL) == expected == estimate_tokens(text)


@given(st.text(max_size=50), st.text(max_size=50))
def test_the_estimate_never_shrinks_when_text_is_added(left: str, right: str) -> None:
    assert estimate_tokens(left + right) >= max(estimate_tokens(left), estimate_tokens(right))
    assert estimate_tokens(left + right) <= estimate_tokens(left) + estimate_tokens(right)


def reference_estimate(text: str) -> int:
    """The per-character estimate the byte-based one replaced: a quarter token per ASCII
    character, half per other 2-byte character, one per wider one (surrogates included)."""
    quarters = sum(1 if c < "\x80" else 2 if c < "\u0800" else 4 for c in text)
    return -(-quarters // 4)


_EVERY_WIDTH = st.characters(exclude_categories=())  # surrogates (Cs) included


@given(st.text(_EVERY_WIDTH, max_size=80))
def test_the_byte_based_estimate_equals_the_per_character_rule(text: str) -> None:
    assert estimate_tokens(text) == reference_estimate(text) == count_tokens(text, MODEL)


@pytest.mark.parametrize(
    "text",
    [
        "\x7f",  # widest ASCII
        "\x80",  # narrowest 2-byte
        "\u07ff",  # widest 2-byte
        "\u0800",  # narrowest 3-byte
        "\ud800",  # a lone surrogate: 3 bytes with surrogatepass
        "\uffff",  # widest 3-byte
        "\U00010000",  # narrowest 4-byte
        "\U0010ffff",  # widest 4-byte
        "a\x80\u0800\U00010000" * 7,
    ],
)
def test_the_estimate_at_each_utf8_width_boundary(text: str) -> None:
    assert estimate_tokens(text) == reference_estimate(text)


def test_a_chinese_history_is_trimmed_by_about_a_token_per_character() -> None:
    # 3 history turns of 40 ideographs (~40 tokens each, 10 by len / 4). With 110 tokens of
    # prompt the old estimate (56 in all) kept all three: about 150 tokens in reality.
    history = [bot("问" * 40), user("答" * 40), bot("说" * 40)]
    messages = [sys_msg("s" * 8), *history, user("为什么")]
    trimmed = trim_to_budget(messages, budget_tokens=110, reserve_tokens=0, model=MODEL)
    assert trimmed == [messages[0], history[1], history[2], messages[-1]]
    assert count_message_tokens(trimmed, MODEL) == (2 + 4) + 2 * (40 + 4) + (3 + 4) + 3


def test_prompt_count_adds_four_per_message_and_three_for_reply_priming() -> None:
    messages = [sys_msg("a" * 8), user("b" * 5)]
    assert count_message_tokens(messages, MODEL) == (2 + 4) + (2 + 4) + 3
    assert count_message_tokens([], MODEL) == REPLY_PRIMING_TOKENS


class _FakeEncoding:
    def encode_ordinary(self, text: str) -> list[int]:
        return [0] * len(text.split())


def test_loadable_tiktoken_encoding_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tiktoken")
    fake.encoding_for_model = lambda model: _FakeEncoding()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    assert count_tokens("one two three four five six", "gpt-4o") == 6


def test_failing_tiktoken_falls_back_to_estimate_and_is_tried_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def offline(model: str) -> object:
        calls.append(model)
        raise ConnectionError("no network")

    fake = types.ModuleType("tiktoken")
    fake.encoding_for_model = offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    assert count_tokens("abcdefgh", "gpt-4o") == 2
    assert count_tokens("abcdefghi", "gpt-4o") == 3
    assert calls == ["gpt-4o"]


def test_missing_tiktoken_falls_back_to_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes the import raise ImportError
    assert count_tokens("abcdefgh", "gpt-4o") == 2


# --- trimming ------------------------------------------------------------------------------


def test_prompt_within_budget_is_unchanged() -> None:
    messages = [sys_msg("s" * 8), bot("h" * 8), user("u" * 8)]
    assert trim_to_budget(messages, budget_tokens=100, reserve_tokens=10, model=MODEL) == messages


def test_oldest_history_is_dropped_first() -> None:
    messages = [sys_msg("s" * 8), user("old" * 4), bot("h" * 8), user("now")]
    # system 6 + bot 6 + user 5 + priming 3 = 20: the 7-token "old" message must go.
    trimmed = trim_to_budget(messages, budget_tokens=30, reserve_tokens=10, model=MODEL)
    assert trimmed == [messages[0], messages[2], messages[3]]


def test_reserve_is_subtracted_from_the_budget() -> None:
    messages = [sys_msg("s" * 8), bot("h" * 8), user("u")]
    total = count_message_tokens(messages, MODEL)
    assert trim_to_budget(messages, budget_tokens=total, reserve_tokens=0, model=MODEL) == messages
    assert trim_to_budget(messages, budget_tokens=total, reserve_tokens=1, model=MODEL) == [
        messages[0],
        messages[2],
    ]


def test_oversized_user_turn_keeps_its_end() -> None:
    messages = [sys_msg("ssss"), bot("history"), user("0123456789abcdefWHAT?")]
    trimmed = trim_to_budget(messages, budget_tokens=16, reserve_tokens=0, model=MODEL)
    # room = 16 - priming 3 - system (4 + 1) - user framing 4 = 4 tokens = 16 characters.
    assert trimmed == [messages[0], user("56789abcdefWHAT?")]
    assert count_message_tokens(trimmed, MODEL) == 16


def test_system_prompt_larger_than_budget_empties_the_user_turn() -> None:
    messages = [sys_msg("s" * 400), user("question")]
    trimmed = trim_to_budget(messages, budget_tokens=50, reserve_tokens=0, model=MODEL)
    assert trimmed == [messages[0], user("")]


def test_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 0, got -1 and 0"):
        trim_to_budget([], budget_tokens=-1, reserve_tokens=0, model=MODEL)


def test_input_list_is_not_modified() -> None:
    messages = [sys_msg("s"), bot("h" * 40), user("u" * 40)]
    snapshot = list(messages)
    trim_to_budget(messages, budget_tokens=10, reserve_tokens=0, model=MODEL)
    assert messages == snapshot


_history = st.lists(
    st.builds(
        ChatMessage,
        role=st.sampled_from([Role.USER, Role.ASSISTANT]),
        content=st.text(max_size=30),
    ),
    max_size=12,
)


@given(
    system=st.text(max_size=40),
    history=_history,
    last=st.text(max_size=60),
    budget=st.integers(min_value=0, max_value=120),
    reserve=st.integers(min_value=0, max_value=40),
)
def test_trimmed_prompt_fits_and_keeps_system_last_user_and_a_history_suffix(
    system: str, history: list[ChatMessage], last: str, budget: int, reserve: int
) -> None:
    messages = [sys_msg(system), *history, user(last)]
    limit = budget - reserve
    trimmed = trim_to_budget(messages, budget_tokens=budget, reserve_tokens=reserve, model=MODEL)

    assert trimmed[0] == messages[0]
    assert trimmed[-1].role is Role.USER
    assert last.endswith(trimmed[-1].content)
    kept_history = trimmed[1:-1]
    assert kept_history == history[len(history) - len(kept_history) :]

    minimum = count_message_tokens([messages[0], user("")], MODEL)
    if minimum <= limit:
        assert count_message_tokens(trimmed, MODEL) <= limit
    else:
        assert trimmed[-1].content == ""
    if trimmed[-1].content != last:
        assert kept_history == []  # the user turn is cut only after all history is gone
        longer = user(last[len(last) - len(trimmed[-1].content) - 1 :])
        assert count_message_tokens([messages[0], longer], MODEL) > limit
    elif len(kept_history) < len(history):
        # Maximal: keeping one more (older) history message would not fit.
        one_more = [messages[0], history[len(history) - len(kept_history) - 1], *trimmed[1:]]
        assert count_message_tokens(one_more, MODEL) > limit


@given(history=_history, budget=st.integers(min_value=13, max_value=200))
def test_messages_after_the_last_user_turn_are_history_too(
    history: list[ChatMessage], budget: int
) -> None:
    messages = [sys_msg("sys"), user("q"), *[bot(m.content) for m in history]]
    trimmed = trim_to_budget(messages, budget_tokens=budget, reserve_tokens=0, model=MODEL)
    assert trimmed[:2] == messages[:2]
    assert trimmed[2:] == messages[len(messages) - len(trimmed) + 2 :]


def test_constants_follow_the_openai_cookbook() -> None:
    assert (TOKENS_PER_MESSAGE, REPLY_PRIMING_TOKENS) == (4, 3)


# --- shedding history (the retry after context_length_exceeded) ----------------------------------


def test_shed_history_drops_the_oldest_until_the_limit_is_met() -> None:
    messages = [sys_msg("s" * 8), user("a" * 40), bot("b" * 40), user("c" * 40), user("now")]
    # system 6 + three of 14 + user 5 + priming 3 = 56; 30 leaves room for one of them
    assert shed_history(messages, limit_tokens=30, model=MODEL) == [
        messages[0],
        messages[3],
        messages[4],
    ]
    assert shed_history(messages, limit_tokens=56, model=MODEL) == messages


def test_shed_history_keeps_system_and_question_whole_even_over_the_limit() -> None:
    messages = [sys_msg("s" * 400), bot("b" * 40), user("q" * 400)]
    shed = shed_history(messages, limit_tokens=10, model=MODEL)
    assert shed == [messages[0], messages[2]]  # no content cut, unlike trim_to_budget


@given(history=_history, limit=st.integers(min_value=0, max_value=200))
def test_shed_history_keeps_a_suffix_of_the_history(history: list[ChatMessage], limit: int) -> None:
    messages = [sys_msg("sys"), *history, user("q")]
    shed = shed_history(messages, limit_tokens=limit, model=MODEL)
    assert shed[0] == messages[0]
    assert shed[-1] == messages[-1]
    kept = shed[1:-1]
    assert kept == history[len(history) - len(kept) :]
    if kept != history:
        assert count_message_tokens(shed, MODEL) <= limit or kept == []
