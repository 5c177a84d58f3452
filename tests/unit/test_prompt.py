"""Unit tests of processors.prompt: persona system prompts and LLM message lists."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.config import PersonaConfig
from processors.prompt import build_messages, build_system_prompt
from schemas.models import ChatMessage, Role


def persona(**fields: Any) -> PersonaConfig:
    return PersonaConfig.model_validate({"name": "Alex", **fields})


def test_system_prompt_states_name_role_traits_tone_language_and_rules() -> None:
    alex = persona(
        role="Support specialist",
        traits=["patient", "precise"],
        tone="friendly",
        language="en",
        business_rules=["Never promise refunds.", "Ask for the order number."],
    )
    assert build_system_prompt(alex) == (
        "You are Alex, a Support specialist.\n"
        "Personality: patient, precise.\n"
        "Tone: friendly.\n"
        "Answer in language: en.\n"
        "Rules:\n"
        "- Never promise refunds.\n"
        "- Ask for the order number."
    )


def test_system_prompt_uses_an_before_a_vowel_role() -> None:
    assert build_system_prompt(persona(role="assistant")).startswith(
        "You are Alex, an assistant.\n"
    )
    assert build_system_prompt(persona(role="Engineer.")).startswith("You are Alex, an Engineer.\n")


def test_system_prompt_omits_personality_and_rules_when_empty() -> None:
    prompt = build_system_prompt(
        persona(traits=[], business_rules=["  "], tone="formal", language="de")
    )
    assert prompt == "You are Alex, an assistant.\nTone: formal.\nAnswer in language: de."


def test_multiline_business_rule_stays_one_bullet() -> None:
    prompt = build_system_prompt(persona(business_rules=["Be brief.\nNo jargon.\n\n- sneaky"]))
    assert prompt.endswith("Rules:\n- Be brief. No jargon. - sneaky")


def _history(n: int) -> list[ChatMessage]:
    return [
        ChatMessage(role=Role.USER if i % 2 == 0 else Role.ASSISTANT, content=f"m{i}")
        for i in range(n)
    ]


def test_messages_are_system_then_last_history_then_user_turn() -> None:
    alex = persona(role="Support specialist")
    messages = build_messages(alex, _history(5), "what now?", max_turns=3)
    assert messages[0] == ChatMessage(role=Role.SYSTEM, content=build_system_prompt(alex))
    assert [m.content for m in messages[1:-1]] == ["m2", "m3", "m4"]
    assert messages[-1] == ChatMessage(role=Role.USER, content="what now?")


def test_zero_max_turns_keeps_no_history() -> None:
    messages = build_messages(persona(), _history(4), "hi", max_turns=0)
    assert [m.role for m in messages] == [Role.SYSTEM, Role.USER]


def test_max_turns_larger_than_history_keeps_all_of_it() -> None:
    messages = build_messages(persona(), _history(2), "hi", max_turns=10)
    assert [m.content for m in messages[1:-1]] == ["m0", "m1"]


def test_negative_max_turns_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_turns must be >= 0, got -1"):
        build_messages(persona(), [], "hi", max_turns=-1)


@given(st.integers(min_value=0, max_value=12), st.integers(min_value=0, max_value=15))
def test_message_count_is_min_of_history_and_max_turns_plus_two(n: int, max_turns: int) -> None:
    history = _history(n)
    messages = build_messages(persona(), history, "q", max_turns)
    assert len(messages) == min(n, max_turns) + 2
    assert messages[1:-1] == history[n - min(n, max_turns) :]
