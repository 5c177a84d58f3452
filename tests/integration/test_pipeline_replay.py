"""End to end on the real broker, redis-server and worker: a corpus slice replayed by many users."""

from __future__ import annotations

import pytest

from connectors.llm.knowledge_loader import load_knowledge_base
from processors.knowledge import KnowledgeBase
from streams.corpus import simulated_users
from streams.replay import replay
from streams.settings import load_config
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration


async def test_every_replayed_turn_is_answered_once_in_its_own_conversation_in_order(
    stack: EmbeddedStack,
) -> None:
    lines = simulated_users(60, seed=11)
    result = await replay(
        stack.settings(), lines, timeout_s=180, on_progress=lambda *_: stack.check_workers()
    )
    stack.check_workers()
    summary = result.summary()

    assert summary["records_in"] == len(lines)
    assert summary["unaccounted"] == 0, summary
    assert summary["dead_lettered"] == 0, [
        o.dead_letter.reason for o in result.outcomes.values() if o.dead_letter
    ]
    assert summary["replies_delivered"] == len(lines)
    assert 0 < summary["latency_p50_ms"] <= summary["latency_p95_ms"]

    config = load_config(stack.settings().config_path())
    kbs: dict[str, KnowledgeBase] = {}
    exact = 0
    for message_id, outcome in result.outcomes.items():
        report = outcome.report
        assert report is not None
        assert report.message_id == message_id
        assert report.conversation_id == outcome.message.conversation_id
        assert report.recipient == outcome.message.sender
        persona = config.personas[report.persona or ""]
        kb_name = persona.knowledge_base
        assert kb_name is not None
        if kb_name not in kbs:
            kbs[kb_name] = load_knowledge_base(config.knowledge_bases[kb_name])
        match = kbs[kb_name].best_answer(outcome.message.content)
        if match is not None and match.score == 100:
            exact += 1
            assert report.content == match.answer, (outcome.message.content, report.content)
        elif match is None:
            assert report.content == persona.fallback_reply
    # Corpus questions are answered from their own knowledge base: crossed replies would fail.
    assert exact >= len(lines) * 0.6

    # The outbox holds deliveries in the order they happened: per conversation it must follow
    # the order the user's turns were published in.
    published, delivered = result.orders(stack.data_dir / "outbox.jsonl")
    assert delivered == published


async def test_same_conversation_id_in_two_tenants_are_separate_conversations(
    stack: EmbeddedStack,
) -> None:
    shared = "conv-shared-by-two-tenants"
    lines = [
        {
            "tenant": "tenant-a",
            "channel": "chat",
            "sender": "a@a.test",
            "conversation_id": shared,
            "content": "My mouse is not responding.",
        },
        {
            "tenant": "tenant-b",
            "channel": "chat",
            "sender": "b@b.test",
            "conversation_id": shared,
            "content": "Hello",
        },
    ]
    first = await replay(stack.settings(), lines[:1], timeout_s=60)
    second = await replay(stack.settings(), lines[1:], timeout_s=60)
    (a,) = first.outcomes.values()
    (b,) = second.outcomes.values()
    assert a.report is not None
    assert b.report is not None
    assert (a.report.tenant, a.report.persona) == ("tenant-a", "support")
    # With a shared key, continuity would have kept tenant A's support persona for tenant B.
    assert (b.report.tenant, b.report.persona) == ("tenant-b", "concierge")
