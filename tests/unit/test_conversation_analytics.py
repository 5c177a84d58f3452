"""Per-conversation analytics: token, cost and latency totals, and the summary on close."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from processors.config import ConversationConfig, PersonaConfig
from processors.conversation import (
    on_close,
    on_llm_response,
    on_user_turn,
    summarize,
)
from processors.conversation_state import (
    IssueLLM,
)
from schemas.models import ConversationEvent, ConversationEventKind, LLMResponse, LLMStatus

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CFG = ConversationConfig()
PERSONAS = {"alex": PersonaConfig(name="Alex")}


def _event(
    event_id: str,
    at: datetime,
    kind: ConversationEventKind = ConversationEventKind.TURN,
    content: str = "hi",
) -> ConversationEvent:
    return ConversationEvent(
        event_id=event_id,
        conversation_id="c1",
        tenant="t",
        kind=kind,
        content=content,
        sender="u",
        origin_created_at=at,
        created_at=at,
    )


def _response(
    turn_id: str, request_id: str, prompt: int, completion: int, cost: float, at: datetime
) -> LLMResponse:
    return LLMResponse(
        request_id=request_id,
        conversation_id="c1",
        tenant="t",
        turn_id=turn_id,
        persona="alex",
        status=LLMStatus.OK,
        content="hello",
        engine="gpt",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
        created_at=at,
    )


def test_tokens_cost_and_latency_accumulate_and_are_summarised_on_close() -> None:
    state = None
    for n, (prompt, completion, cost) in enumerate([(10, 5, 0.001), (20, 7, 0.002)]):
        at = T0 + timedelta(seconds=10 * n)
        t = on_user_turn(
            state,
            _event(f"m{n}", at),
            persona="alex",
            override_continuity=False,
            continuity=True,
            cfg=CFG,
            personas=PERSONAS,
            now=at,
        )
        (issue,) = [e for e in t.effects if isinstance(e, IssueLLM)]
        answered_at = at + timedelta(milliseconds=200 * (n + 1))
        t = on_llm_response(
            t.state,
            _response(f"m{n}", issue.request.request_id, prompt, completion, cost, answered_at),
            cfg=CFG,
            now=answered_at,
        )
        state = t.state
    assert state is not None
    assert (state.prompt_tokens, state.completion_tokens) == (30, 12)
    closed = on_close(
        state,
        _event("close", T0 + timedelta(minutes=1), ConversationEventKind.CLOSE, "bye"),
        T0 + timedelta(minutes=1),
    )
    summary = summarize(closed.state, "bye", T0 + timedelta(minutes=1))
    assert (summary.status, summary.reason, summary.persona) == ("closed", "bye", "alex")
    assert (summary.user_turns, summary.assistant_turns) == (2, 2)
    assert (summary.prompt_tokens, summary.completion_tokens) == (30, 12)
    assert summary.cost_usd == 0.003
    assert summary.avg_reply_latency_ms == 300.0  # (200 + 400) / 2
    assert summary.last_engine == "gpt"
    assert summary.closed_at == T0 + timedelta(minutes=1)
