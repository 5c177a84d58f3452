"""Tests of the knowledge base retrieval and of loading chatterbot-corpus style sources."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.llm.knowledge_loader import load_dialogs, load_knowledge_base, load_knowledge_bases
from processors.config import KnowledgeBaseConfig
from processors.knowledge import KnowledgeBase, Match, pairs_from_dialogs

PAIRS = [
    ("What are your opening hours?", "We are open 9am to 5pm, Monday to Friday."),
    ("How do I reset my password?", "Use the 'Forgot password' link on the sign-in page."),
    ("Where is my order?", "Track it under My Orders."),
    ("where is my ORDER", "A second answer that should never win."),
]


@pytest.fixture
def kb() -> KnowledgeBase:
    return KnowledgeBase(PAIRS, min_score=60.0)


def test_exact_question_ignoring_case_and_punctuation_scores_100(kb: KnowledgeBase) -> None:
    match = kb.best_answer("  WHAT are your opening hours ")
    assert match == Match(
        answer="We are open 9am to 5pm, Monday to Friday.",
        question="What are your opening hours?",
        score=100.0,
    )


def test_duplicate_question_keeps_all_answers_and_returns_the_first(kb: KnowledgeBase) -> None:
    assert len(kb) == 3
    assert kb.answers("Where is my order?") == [
        "Track it under My Orders.",
        "A second answer that should never win.",
    ]
    match = kb.best_answer("where is my order")
    assert match is not None
    assert match.answer == "Track it under My Orders."


def test_question_with_typos_finds_the_closest_answer(kb: KnowledgeBase) -> None:
    match = kb.best_answer("how do i reset my pasword")
    assert match is not None
    assert match.question == "How do I reset my password?"
    assert 60.0 <= match.score < 100.0


def test_unrelated_query_below_cutoff_returns_none(kb: KnowledgeBase) -> None:
    assert kb.best_answer("quantum chromodynamics lecture notes") is None
    assert kb.best_answer("?!") is None


def test_higher_cutoff_rejects_a_fuzzy_match() -> None:
    strict = KnowledgeBase(PAIRS, min_score=99.0)
    assert strict.best_answer("how do i reset my pasword") is None
    assert strict.best_answer("How do I reset my password") is not None


def test_invalid_min_score_is_rejected() -> None:
    with pytest.raises(ValueError, match="0-100"):
        KnowledgeBase(PAIRS, min_score=101)


def test_blank_questions_and_answers_are_skipped() -> None:
    kb = KnowledgeBase([("!!!", "punctuation only"), ("hi", "  "), ("hey", "hello")])
    assert len(kb) == 1
    assert kb.answers("hi") == []


@given(st.text(max_size=40))
def test_lookup_is_deterministic_across_instances(query: str) -> None:
    assert KnowledgeBase(PAIRS).best_answer(query) == KnowledgeBase(PAIRS).best_answer(query)


def test_dialogs_become_consecutive_pairs() -> None:
    dialogs = [["a", "b", "c"], ["x"], ["q", "r"]]
    assert pairs_from_dialogs(dialogs) == [("a", "b"), ("b", "c"), ("q", "r")]


def test_yaml_scalars_are_kept_as_text_and_empty_statements_skipped(
    tmp_path: Path,
) -> None:
    source = tmp_path / "faq.yml"
    source.write_text(
        "categories: [faq]\n"
        "conversations:\n"
        "- - How many days in a week?\n"
        "  - 7\n"
        "  - !!int 8\n"
        "  - ''\n"
        "  - null\n"
        "- []\n"
        "- a malformed dialog that is a bare string\n"
        "- - Is it true?\n"
        "  - yes\n",
        encoding="utf-8",
    )
    assert load_dialogs(str(source)) == [
        ["How many days in a week?", "7", "8"],
        ["Is it true?", "yes"],
    ]


def test_missing_file_error_names_the_source(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yml")
    with pytest.raises(FileNotFoundError, match=r"nope\.yml"):
        load_dialogs(missing)


def test_file_without_conversations_is_rejected(tmp_path: Path) -> None:
    source = tmp_path / "bad.yml"
    source.write_text("categories: [x]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'conversations' list"):
        load_dialogs(str(source))


def test_unknown_chatterbot_topic_lists_available_topics() -> None:
    with pytest.raises(FileNotFoundError, match=r"no topic 'nonsense'.*greetings"):
        load_dialogs("chatterbot:english/nonsense")


def test_unknown_chatterbot_language_lists_available_languages() -> None:
    with pytest.raises(FileNotFoundError, match=r"no language 'klingon'.*english"):
        load_dialogs("chatterbot:klingon/greetings")


def test_chatterbot_source_must_not_escape_the_corpus() -> None:
    with pytest.raises(FileNotFoundError, match="expected 'chatterbot:<language>/<topic>'"):
        load_dialogs("chatterbot:../english/greetings")


def test_knowledge_base_merges_sources_in_order(tmp_path: Path) -> None:
    own = tmp_path / "own.yml"
    own.write_text("conversations:\n- - Hello\n  - Welcome to Acme!\n", encoding="utf-8")
    cfg = KnowledgeBaseConfig(sources=[str(own), "chatterbot:english/greetings"], min_score=70.0)

    kb = load_knowledge_base(cfg)
    assert kb.min_score == 70.0
    assert kb.answers("hello")[0] == "Welcome to Acme!"
    assert len(kb.answers("hello")) > 1
    match = kb.best_answer("How are you doing?")
    assert match is not None
    assert match.question == "How are you doing?"
    assert set(load_knowledge_bases({"faq": cfg})) == {"faq"}
