"""Tests of the local knowledge-base engine."""

from __future__ import annotations

import time

import pytest

from connectors.llm.base import CompletionRequest, LLMEngine
from connectors.llm.knowledge_loader import load_knowledge_base
from connectors.llm.local import LocalEngine, estimate_tokens
from processors.config import KnowledgeBaseConfig, PersonaConfig
from processors.knowledge import KnowledgeBase
from schemas.models import ChatMessage, Role

BILLING = KnowledgeBase([("How do I pay my bill?", "Pay online under Billing.")])
TRAVEL = KnowledgeBase([("How do I pay my bill?", "Pay at the hotel desk.")])


def persona(name: str, kb: str | None) -> PersonaConfig:
    return PersonaConfig.model_validate(
        {"name": name, "knowledge_base": kb, "fallback_reply": f"{name} does not know."}
    )


def request(p: PersonaConfig, *messages: tuple[Role, str]) -> CompletionRequest:
    return CompletionRequest(
        persona_id=p.name.lower(),
        persona=p,
        messages=[ChatMessage(role=role, content=content) for role, content in messages],
    )


@pytest.fixture
def engine() -> LocalEngine:
    return LocalEngine({"billing": BILLING, "travel": TRAVEL})


def test_engine_implements_the_llm_engine_interface(engine: LocalEngine) -> None:
    assert isinstance(engine, LLMEngine)
    assert engine.name == "local"


async def test_last_user_message_is_answered_from_the_knowledge_base(engine: LocalEngine) -> None:
    req = request(
        persona("Billie", "billing"),
        (Role.SYSTEM, "You are Billie."),
        (Role.USER, "hi"),
        (Role.ASSISTANT, "Hello!"),
        (Role.USER, "how do i pay my bill"),
    )
    completion = await engine.complete(req)
    assert completion.content == "Pay online under Billing."
    assert (completion.model, completion.finish_reason) == ("local-kb", "stop")


async def test_each_persona_uses_its_own_knowledge_base(engine: LocalEngine) -> None:
    question = (Role.USER, "How do I pay my bill?")
    billing = await engine.complete(request(persona("Billie", "billing"), question))
    travel = await engine.complete(request(persona("Trav", "travel"), question))
    assert (billing.content, travel.content) == (
        "Pay online under Billing.",
        "Pay at the hotel desk.",
    )


async def test_no_match_returns_the_persona_fallback(engine: LocalEngine) -> None:
    completion = await engine.complete(
        request(persona("Billie", "billing"), (Role.USER, "what is the meaning of life"))
    )
    assert (completion.content, completion.finish_reason) == ("Billie does not know.", "fallback")


@pytest.mark.parametrize("kb", [None, "not-loaded"])
async def test_persona_without_a_loaded_knowledge_base_falls_back(
    engine: LocalEngine, kb: str | None
) -> None:
    completion = await engine.complete(
        request(persona("Nobody", kb), (Role.USER, "How do I pay my bill?"))
    )
    assert (completion.content, completion.finish_reason) == ("Nobody does not know.", "fallback")


async def test_token_counts_are_the_quarter_character_estimate(engine: LocalEngine) -> None:
    req = request(
        persona("Billie", "billing"), (Role.SYSTEM, "x" * 9), (Role.USER, "How do I pay my bill?")
    )
    completion = await engine.complete(req)
    assert completion.prompt_tokens == 3 + 6  # ceil(9/4) + ceil(21/4)
    assert completion.completion_tokens == estimate_tokens("Pay online under Billing.") == 7
    assert estimate_tokens("") == 0


async def test_same_request_always_gets_the_same_completion(engine: LocalEngine) -> None:
    req = request(persona("Billie", "billing"), (Role.USER, "pay bill how"))
    results = {await engine.complete(req) for _ in range(5)}
    assert len(results) == 1


async def test_configured_latency_delays_each_call() -> None:
    slow = LocalEngine({}, latency_s=0.05)
    started = time.perf_counter()
    await slow.complete(request(persona("Nobody", None), (Role.USER, "hi")))
    assert time.perf_counter() - started >= 0.045


def test_negative_latency_is_rejected() -> None:
    with pytest.raises(ValueError, match="latency_s"):
        LocalEngine({}, latency_s=-1.0)


async def test_chatterbot_greetings_corpus_answers_hello_with_a_greeting() -> None:
    kb = load_knowledge_base(KnowledgeBaseConfig(sources=["chatterbot:english/greetings"]))
    engine = LocalEngine({"greetings": kb})
    completion = await engine.complete(
        request(persona("Greeter", "greetings"), (Role.USER, "Hello"))
    )
    assert completion.finish_reason == "stop"
    assert completion.content in {"Hi", "Hello", "Greetings!", "Hi there!", "Hey"}
