"""Unit tests of processors.business_rules: turn verdicts, reply fix-up and prompt rule lines."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.business_rules import (
    Answer,
    Decline,
    Escalate,
    business_rule_lines,
    check_turn,
    failure_reply,
    finalize_reply,
    find_phrase,
)
from processors.config import PersonaConfig
from processors.prompt import build_system_prompt
from schemas.models import LLMStatus

DISCLAIMER = "This is not financial advice."


def persona(**fields: Any) -> PersonaConfig:
    return PersonaConfig.model_validate({"name": "Fin", **fields})


ADVISOR = persona(
    role="financial advisor",
    forbidden_topics=["crypto", "tax evasion"],
    escalation_triggers=["speak to a human", "complaint"],
    disclaimer=DISCLAIMER,
    business_rules=["Always state investment risk."],
)


# --- check_turn ---------------------------------------------------------------------------


def test_plain_question_is_answered() -> None:
    assert check_turn(ADVISOR, "How do index funds work?") == Answer()


def test_escalation_trigger_escalates_with_the_configured_phrase() -> None:
    assert check_turn(ADVISOR, "I want to SPEAK TO A HUMAN now") == Escalate("speak to a human")


def test_trigger_phrase_matches_across_line_breaks_and_double_spaces() -> None:
    assert check_turn(ADVISOR, "please let me speak to\na  human") == Escalate("speak to a human")


def test_forbidden_topic_declines_with_the_configured_topic() -> None:
    assert check_turn(ADVISOR, "Should I buy Crypto?") == Decline("crypto")
    assert check_turn(ADVISOR, "tips on tax evasion.") == Decline("tax evasion")


def test_escalation_wins_over_decline() -> None:
    assert check_turn(ADVISOR, "crypto lost my savings, I have a complaint") == Escalate(
        "complaint"
    )


@pytest.mark.parametrize(
    "content",
    ["cryptocurrency prices", "encrypto", "complaints department", "my tax evasions"],
)
def test_phrases_match_only_on_word_boundaries(content: str) -> None:
    assert check_turn(ADVISOR, content) == Answer()


def test_phrase_may_start_and_end_with_punctuation() -> None:
    assert find_phrase("is C++ hard?", ["c++"]) == "c++"
    assert find_phrase("does C++17 help?", ["c++"]) is None


def test_blank_phrases_never_match() -> None:
    assert check_turn(persona(escalation_triggers=["", "  "], forbidden_topics=[" "]), "") == (
        Answer()
    )


def test_first_configured_phrase_wins_when_several_occur() -> None:
    assert find_phrase("a complaint: speak to a human", ["speak to a human", "complaint"]) == (
        "speak to a human"
    )


def test_regex_metacharacters_in_phrases_are_literal() -> None:
    assert find_phrase("price (usd)", ["(usd)"]) == "(usd)"
    assert find_phrase("price usd", ["(usd)"]) is None
    assert find_phrase("a.b", ["a*b"]) is None


def test_verdicts_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Escalate("x").trigger = "y"  # type: ignore[misc]  # the point: assignment must fail


_word = st.text(alphabet="abcdefghij", min_size=1, max_size=6)


@given(st.lists(_word, min_size=1, max_size=5), _word, _word)
def test_any_configured_phrase_embedded_between_spaces_is_found(
    words: list[str], before: str, after: str
) -> None:
    phrase = " ".join(words)
    text = f"{before} {phrase.upper()} {after}"
    assert find_phrase(text, [phrase]) is not None
    assert check_turn(persona(escalation_triggers=[phrase]), text) == Escalate(phrase)


@given(_word, _word)
def test_a_phrase_glued_to_a_word_is_not_found(phrase: str, glue: str) -> None:
    assert find_phrase(f"{glue}{phrase} {phrase}{glue}", [phrase]) is None


# --- finalize_reply ------------------------------------------------------------------------


def test_disclaimer_is_appended_as_its_own_paragraph() -> None:
    assert finalize_reply(ADVISOR, "  Diversify.\n") == f"Diversify.\n\n{DISCLAIMER}"


def test_disclaimer_already_present_is_not_repeated() -> None:
    reply = "Diversify.\n\nthis is not\nfinancial advice."
    assert finalize_reply(ADVISOR, reply) == reply


def test_reply_without_disclaimer_config_is_only_stripped() -> None:
    assert finalize_reply(persona(), "\n hello \n") == "hello"
    assert finalize_reply(persona(disclaimer="   "), "hello") == "hello"


def test_empty_reply_becomes_fallback_with_disclaimer() -> None:
    fin = persona(fallback_reply="I can't help with that.", disclaimer=DISCLAIMER)
    assert finalize_reply(fin, " \n ") == f"I can't help with that.\n\n{DISCLAIMER}"


def test_empty_reply_and_blank_fallback_use_the_default_fallback() -> None:
    default = PersonaConfig.model_fields["fallback_reply"].default
    assert finalize_reply(persona(fallback_reply=" "), "") == default


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=20)))
def test_finalized_reply_is_never_empty_and_ends_with_any_disclaimer(
    content: str, disclaimer: str | None
) -> None:
    reply = finalize_reply(persona(disclaimer=disclaimer), content)
    assert reply.strip() == reply != ""
    if disclaimer is not None and disclaimer.strip():
        assert " ".join(disclaimer.split()).casefold() in " ".join(reply.split()).casefold()
    assert finalize_reply(persona(disclaimer=disclaimer), reply) == reply


# --- business_rule_lines and the system prompt ---------------------------------------------


def test_rule_lines_list_rules_topics_triggers_and_disclaimer_in_order() -> None:
    assert business_rule_lines(ADVISOR) == [
        "Always state investment risk.",
        "Do not discuss: crypto, tax evasion.",
        'If the user mentions "speak to a human", "complaint", say you will hand over to a human.',
        f"End every reply with: {DISCLAIMER}",
    ]


def test_rule_lines_are_empty_without_rules() -> None:
    assert business_rule_lines(persona(forbidden_topics=[" "], disclaimer="")) == []


def test_rule_lines_collapse_newlines_in_config_values() -> None:
    lines = business_rule_lines(persona(forbidden_topics=["a\nb"], disclaimer="x\n- y"))
    assert lines == ["Do not discuss: a b.", "End every reply with: x - y"]


def test_system_prompt_lists_every_rule_line_as_a_bullet() -> None:
    prompt = build_system_prompt(ADVISOR)
    rules_block = prompt.split("Rules:\n", 1)[1].split("\n")
    assert rules_block == [f"- {line}" for line in business_rule_lines(ADVISOR)]


# --- failure_reply ------------------------------------------------------------------------


def test_failure_reply_apologises_or_hands_off_with_the_disclaimer() -> None:
    fin = persona(apology_reply="Sorry, try later.", handoff_reply="A human will call.")
    assert failure_reply(fin, "apology") == (LLMStatus.FALLBACK, "Sorry, try later.")
    assert failure_reply(fin, "apology", LLMStatus.FAILED) == (
        LLMStatus.FAILED,
        "Sorry, try later.",
    )
    assert failure_reply(fin, "handoff") == (LLMStatus.ESCALATED, "A human will call.")
    status, reply = failure_reply(ADVISOR, "apology")
    assert status is LLMStatus.FALLBACK
    assert reply.endswith(DISCLAIMER)
