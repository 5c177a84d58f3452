"""Conversation lifecycle on a real worker: explicit close, and inactivity timeouts that
survive a worker restart; each ended session publishes its analytics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.stacks import new_stack
from support.topics import find_record

from schemas.models import ConversationSummary
from streams.agents.ingest import COMMAND_KEY
from streams.replay import replay
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def lifecycle_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    def change(raw: dict[str, Any]) -> None:
        raw["conversation"]["inactivity_timeout_s"] = TIMEOUT_S

    stack = new_stack(tmp_path_factory.mktemp("lifecycle"), "life", change)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _turn(conversation: str, content: str, **metadata: str) -> dict[str, object]:
    return {
        "tenant": "life",
        "channel": "chat",
        "sender": f"{conversation}@life.test",
        "conversation_id": conversation,
        "content": content,
        "metadata": metadata,
    }


async def _summary(stack: EmbeddedStack, conversation: str, wait_s: float) -> ConversationSummary:
    return await find_record(
        stack,
        stack.settings().topics.analytics,
        ConversationSummary,
        lambda s: s.conversation_id == conversation,
        wait_s=wait_s,
    )


def test_close_command_ends_the_conversation_and_publishes_its_analytics(
    lifecycle_stack: EmbeddedStack,
) -> None:
    stack = lifecycle_stack
    conversation = f"close-{uuid.uuid4().hex[:6]}"
    answered = asyncio.run(
        replay(
            stack.settings(),
            [
                _turn(conversation, "Hello"),
                _turn(conversation, "My mouse is not responding."),
            ],
            timeout_s=60,
        )
    )
    assert answered.summary()["replies_delivered"] == 2
    # A command is not answered, so its replay reports it unaccounted: that is expected here.
    asyncio.run(
        replay(
            stack.settings(),
            [_turn(conversation, "user left", **{COMMAND_KEY: "close"})],
            timeout_s=1,
        )
    )
    summary = asyncio.run(_summary(stack, conversation, 30))
    assert (summary.status, summary.reason) == ("closed", "user left")
    assert (summary.user_turns, summary.assistant_turns) == (2, 2)
    assert summary.last_engine == "local"
    assert summary.prompt_tokens > 0
    assert summary.avg_reply_latency_ms > 0
    assert summary.persona == "concierge"


def test_idle_conversation_times_out_even_across_a_worker_restart(
    lifecycle_stack: EmbeddedStack,
) -> None:
    stack = lifecycle_stack
    conversation = f"idle-{uuid.uuid4().hex[:6]}"
    answered = asyncio.run(replay(stack.settings(), [_turn(conversation, "Hello")], timeout_s=60))
    assert answered.summary()["replies_delivered"] == 1
    stack.worker_procs[0].kill()  # the state must come back from the changelog
    stack.start_worker(0)
    summary = asyncio.run(_summary(stack, conversation, 60))
    assert (summary.status, summary.reason) == ("timed_out", "timeout")
    assert summary.closed_at >= summary.opened_at
    assert (summary.closed_at - summary.opened_at).total_seconds() >= TIMEOUT_S
