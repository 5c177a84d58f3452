"""Tests of the conversation state machine: order, exactly one reply per turn, lifecycle."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.records import llm_answer as answer

from processors.config import ConversationConfig, PersonaConfig
from processors.conversation import (
    check_timeout,
    ended_at,
    no_answer,
    on_close,
    on_llm_response,
    on_user_turn,
    prune_at,
    prune_due,
    reissue_due,
    shed_history,
    summarize,
    unanswered_turn,
)
from processors.conversation_state import (
    Closed,
    ConversationState,
    ConversationStatus,
    Deliver,
    Dropped,
    Effect,
    HandOff,
    IssueLLM,
    Refused,
    Transition,
)
from processors.ids import scoped_id
from schemas.models import (
    Channel,
    ConversationEvent,
    ConversationEventKind,
    LLMRequest,
    LLMResponse,
    LLMStatus,
    Priority,
    Role,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CFG = ConversationConfig(
    max_history_turns=4, inactivity_timeout_s=600.0, llm_deadline_s=30.0, ended_retention_s=3600.0
)
RETENTION = timedelta(seconds=3600)
PERSONAS = {
    "concierge": PersonaConfig.model_validate({"name": "Concierge"}),
    "support": PersonaConfig.model_validate({"name": "Support"}),
}


def event(
    event_id: str,
    content: str = "hello",
    *,
    conversation_id: str = "c1",
    kind: ConversationEventKind = ConversationEventKind.TURN,
    at: datetime = T0,
    **fields: object,
) -> ConversationEvent:
    return ConversationEvent.model_validate(
        {
            "event_id": event_id,
            "conversation_id": conversation_id,
            "tenant": "acme",
            "kind": kind,
            "content": content,
            "sender": "+15550001",
            "origin_created_at": at,
            "created_at": at,
            **fields,
        }
    )


def user_turn(
    state: ConversationState | None,
    ev: ConversationEvent,
    *,
    now: datetime = T0,
    persona: str = "concierge",
    override: bool = False,
    continuity: bool = True,
    cfg: ConversationConfig = CFG,
) -> Transition:
    return on_user_turn(
        state,
        ev,
        persona=persona,
        override_continuity=override,
        continuity=continuity,
        cfg=cfg,
        personas=PERSONAS,
        now=now,
    )


def respond(state: ConversationState, response: LLMResponse, now: datetime = T0) -> Transition:
    return on_llm_response(state, response, cfg=CFG, now=now)


def only(effects: list[Effect], kind: type[Effect]) -> list[Effect]:
    return [e for e in effects if isinstance(e, kind)]


def issued(t: Transition) -> LLMRequest:
    (effect,) = only(t.effects, IssueLLM)
    assert isinstance(effect, IssueLLM)
    return effect.request


def delivered(t: Transition) -> Deliver:
    (effect,) = only(t.effects, Deliver)
    assert isinstance(effect, Deliver)
    return effect


def test_first_user_turn_opens_conversation_and_issues_llm_request() -> None:
    t = user_turn(None, event("e1", "Where is my order?"))

    request = issued(t)
    assert t.effects == [IssueLLM(request)]
    assert request.request_id == "e1:0"
    assert request.turn_id == "e1"
    assert request.persona == "concierge"
    assert [(m.role, m.content) for m in request.messages] == [(Role.USER, "Where is my order?")]
    assert request.deadline_at == T0 + timedelta(seconds=30)
    assert t.state.status is ConversationStatus.OPEN
    assert t.state.pending is not None
    assert t.state.pending.turn_id == "e1"
    assert t.state.user_turns == 1


def test_second_user_turn_waits_until_first_is_answered() -> None:
    first = user_turn(None, event("e1", "one"))
    second = user_turn(first.state, event("e2", "two"), now=T0 + timedelta(seconds=1))

    assert second.effects == []
    assert [q.turn_id for q in second.state.queue] == ["e2"]

    reply = respond(second.state, answer(issued(first), "uno"), now=T0 + timedelta(seconds=2))

    assert [type(e) for e in reply.effects] == [Deliver, IssueLLM]
    assert delivered(reply).request.message_id == "e1"
    nxt = issued(reply)
    assert nxt.turn_id == "e2"
    assert [(m.role, m.content) for m in nxt.messages] == [
        (Role.USER, "one"),
        (Role.ASSISTANT, "uno"),
        (Role.USER, "two"),
    ]
    assert reply.state.queue == []
    assert reply.state.status is ConversationStatus.ACTIVE


def test_reply_delivery_carries_the_routing_of_the_user_turn() -> None:
    ev = event(
        "e1",
        channel=Channel.SMS,
        subject="Order 42",
        priority=Priority.HIGH,
        metadata={"ticket": "T-1"},
        at=T0 - timedelta(seconds=3),
    )
    t = user_turn(None, ev, persona="support")
    reply = delivered(respond(t.state, answer(issued(t), "On its way")))

    req = reply.request
    assert (req.message_id, req.conversation_id) == ("e1", "c1")
    assert req.delivery_id == scoped_id("e1:reply", req.tenant, "c1")
    assert req.delivery_id.startswith("e1:reply@")
    assert (req.channel, req.recipient, req.subject) == (Channel.SMS, "+15550001", "Re: Order 42")
    assert (req.priority, req.metadata, req.persona) == (
        Priority.HIGH,
        {"ticket": "T-1"},
        "support",
    )
    assert req.content == "On its way"
    assert req.origin_created_at == T0 - timedelta(seconds=3)


def test_reply_subject_is_not_prefixed_twice() -> None:
    t = user_turn(None, event("e1", subject="RE: Order 42"))
    assert delivered(respond(t.state, answer(issued(t)))).request.subject == "RE: Order 42"


def test_duplicate_user_turn_is_dropped_whether_pending_queued_or_answered() -> None:
    first = user_turn(None, event("e1"))
    second = user_turn(first.state, event("e2"))

    assert user_turn(second.state, event("e1")).effects == [Dropped("e1", "duplicate")]
    assert user_turn(second.state, event("e2")).effects == [Dropped("e2", "duplicate")]
    answered = respond(second.state, answer(issued(first)))
    again = user_turn(answered.state, event("e1"))
    assert again.effects == [Dropped("e1", "duplicate")]
    assert again.state.user_turns == 2


def test_duplicate_and_stale_responses_are_dropped() -> None:
    first = user_turn(None, event("e1"))
    second = user_turn(first.state, event("e2"))
    reply = respond(second.state, answer(issued(first)))

    assert respond(reply.state, answer(issued(first))).effects == [Dropped("e1:0", "duplicate")]
    foreign = answer(issued(first)).model_copy(update={"turn_id": "zz", "request_id": "zz:0"})
    assert respond(reply.state, foreign).effects == [Dropped("zz:0", "stale")]


def test_response_for_unknown_conversation_is_dropped() -> None:
    request = issued(user_turn(None, event("e1")))
    t = on_llm_response(None, answer(request), cfg=CFG, now=T0)
    assert t.effects == [Dropped("e1:0", "unknown_conversation")]
    assert t.state.sessions == 0


def test_history_is_bounded_and_drops_oldest_turns() -> None:
    state: ConversationState | None = None
    for i in range(4):
        t = user_turn(state, event(f"e{i}", f"q{i}"))
        t = respond(t.state, answer(issued(t), f"a{i}"))
        state = t.state
    assert state is not None
    assert [turn.content for turn in state.history] == ["q2", "a2", "q3", "a3"]
    request = issued(user_turn(state, event("e9", "q9")))
    assert [m.content for m in request.messages] == ["a2", "q3", "a3", "q9"]


def _conversation_with_history(sizes: list[int]) -> ConversationState:
    state: ConversationState | None = None
    for i, size in enumerate(sizes):
        t = user_turn(state, event(f"e{i}", "q" * size))
        t = respond(t.state, answer(issued(t), "\u00e9" * size))  # 2 bytes a character
        state = t.state
    assert state is not None
    return state


@pytest.mark.parametrize("excess", [1, 40, 41, 300, 500, 1_500, 3_000, 3_400])
def test_shed_history_drops_the_fewest_oldest_turns_and_counts_bytes_exactly(excess: int) -> None:
    state = _conversation_with_history([10, 200, 1000])  # history: a1 q2 a2 (bounded to 4)
    state = user_turn(state, event("e9", "still pending")).state  # pending, in the history
    size = len(state.model_dump_json().encode())
    shed = shed_history(state, excess)
    assert shed is not None
    smaller, dropped = shed
    assert smaller.history == state.history[dropped:]
    freed = size - len(smaller.model_dump_json().encode())
    assert freed >= excess
    if dropped > 1:  # one turn fewer would not have been enough
        fewer = state.model_copy(update={"history": state.history[dropped - 1 :]})
        assert size - len(fewer.model_dump_json().encode()) < excess
    # nothing but the history changed: the turn in flight, the dedup ids, the counters
    assert smaller.model_copy(update={"history": state.history}) == state


def test_shed_history_can_empty_the_history_and_says_when_that_is_not_enough() -> None:
    state = _conversation_with_history([100, 100])
    size = len(state.model_dump_json().encode())
    empty = state.model_copy(update={"history": []})
    whole = size - len(empty.model_dump_json().encode())
    assert shed_history(state, whole) == (empty, len(state.history))
    assert shed_history(state, whole + 1) is None
    assert shed_history(empty, 1) is None


def test_overdue_turn_is_reissued_and_first_response_of_any_attempt_wins() -> None:
    t = user_turn(None, event("e1"))
    assert reissue_due(t.state, T0 + timedelta(seconds=30), CFG).effects == []

    again = reissue_due(t.state, T0 + timedelta(seconds=31), CFG)
    retry = issued(again)
    assert (retry.request_id, retry.attempt, retry.turn_id) == ("e1:1", 1, "e1")
    assert retry.messages == issued(t).messages
    # attempt 1 may take twice as long before it is re-issued, and says so to the LLM stage
    assert retry.deadline_at == retry.created_at + timedelta(seconds=60)
    assert again.state.reissues == 1

    late_first = respond(again.state, answer(issued(t)))
    assert delivered(late_first).request.delivery_id.startswith("e1:reply@")
    assert respond(late_first.state, answer(retry)).effects == [Dropped("e1:1", "duplicate")]


def test_after_the_last_attempts_deadline_the_turn_is_answered_by_the_stage() -> None:
    cfg = CFG.model_copy(update={"max_llm_attempts": 2})
    t = user_turn(None, event("e1"), cfg=cfg)
    queued = user_turn(t.state, event("e2", "and another thing"), cfg=cfg)
    assert unanswered_turn(queued.state, T0 + timedelta(seconds=31), cfg) is None
    again = reissue_due(queued.state, T0 + timedelta(seconds=31), cfg)
    assert issued(again).attempt == 1
    reissued_at = T0 + timedelta(seconds=31)

    # attempt 1 is the last: its deadline (60 s) passing re-issues nothing and names the turn
    late = reissued_at + timedelta(seconds=61)
    assert unanswered_turn(again.state, reissued_at + timedelta(seconds=60), cfg) is None
    assert reissue_due(again.state, late, cfg) == Transition(again.state, [])
    turn = unanswered_turn(again.state, late, cfg)
    assert turn is not None
    assert turn.turn_id == "e1"

    apology = no_answer(again.state, turn, LLMStatus.FALLBACK, "Sorry!", "no response", late)
    assert (apology.request_id, apology.engine, apology.error) == ("e1:1", "none", "no response")
    done = on_llm_response(again.state, apology, cfg=cfg, now=late)
    assert delivered(done).request.content == "Sorry!"
    assert issued(done).turn_id == "e2"  # the queued turn goes on
    assert done.state.fallback_replies == 1
    # the LLM stage's own answer, should it come after all, is a duplicate
    stale = on_llm_response(done.state, answer(issued(again)), cfg=cfg, now=late)
    assert stale.effects == [Dropped("e1:1", "duplicate")]


def test_a_handoff_given_by_the_stage_escalates_the_turn() -> None:
    cfg = CFG.model_copy(update={"max_llm_attempts": 1})
    t = user_turn(None, event("e1"), cfg=cfg)
    late = T0 + timedelta(seconds=31)
    assert reissue_due(t.state, late, cfg).effects == []
    turn = unanswered_turn(t.state, late, cfg)
    assert turn is not None
    handed = on_llm_response(
        t.state,
        no_answer(t.state, turn, LLMStatus.ESCALATED, "A human will help.", "no response", late),
        cfg=cfg,
        now=late,
    )
    (handoff,) = only(handed.effects, HandOff)
    assert isinstance(handoff, HandOff)
    assert handoff.event.metadata["handoff.reason"] == "no response"
    assert delivered(handed).request.content == "A human will help."


def test_reissue_without_pending_turn_does_nothing() -> None:
    t = user_turn(None, event("e1"))
    done = respond(t.state, answer(issued(t)))
    assert reissue_due(done.state, T0 + timedelta(hours=1), CFG) == Transition(done.state, [])


def test_ongoing_conversation_keeps_its_persona_unless_overridden() -> None:
    t = user_turn(None, event("e1"), persona="concierge")
    t = respond(t.state, answer(issued(t)))

    kept = user_turn(t.state, event("e2"), persona="support")
    assert issued(kept).persona == "concierge"
    overridden = user_turn(t.state, event("e2"), persona="support", override=True)
    assert issued(overridden).persona == "support"
    no_continuity = user_turn(t.state, event("e2"), persona="support", continuity=False)
    assert issued(no_continuity).persona == "support"
    assert no_continuity.state.persona == "support"


def test_persona_no_longer_configured_is_replaced_and_unknown_persona_raises() -> None:
    t = user_turn(None, event("e1"))
    gone = t.state.model_copy(update={"persona": "retired", "pending": None, "history": []})
    assert issued(user_turn(gone, event("e2"), persona="support")).persona == "support"
    with pytest.raises(ValueError, match="unknown persona 'nobody'"):
        user_turn(None, event("e3"), persona="nobody")


def test_idle_conversation_is_timed_out_lazily_and_reopened_fresh() -> None:
    t = user_turn(None, event("e1"))
    t = respond(t.state, answer(issued(t)), now=T0 + timedelta(seconds=5))
    later = T0 + timedelta(seconds=5 + 600)

    reopened = user_turn(t.state, event("e2", "back again", at=later), now=later, persona="support")

    assert [type(e) for e in reopened.effects] == [Closed, IssueLLM]
    closed = reopened.effects[0]
    assert isinstance(closed, Closed)
    assert closed.reason == "timeout"
    assert closed.ended is not None  # the session that ended, not the one just opened
    assert (closed.ended.status, closed.ended.sessions, closed.ended.opened_at) == (
        "timed_out",
        1,
        T0,
    )
    assert (closed.ended.user_turns, closed.ended.assistant_turns) == (1, 1)
    summary = summarize(closed.ended, closed.reason, later)
    assert (summary.status, summary.session, summary.user_turns) == ("timed_out", 1, 1)
    assert [m.content for m in issued(reopened).messages] == ["back again"]
    assert issued(reopened).persona == "support"
    s = reopened.state
    assert (s.status, s.sessions, s.opened_at, s.created_at) == ("open", 2, later, T0)
    assert (s.user_turns, s.assistant_turns) == (2, 1)
    assert user_turn(s, event("e1"), now=later).effects == [Dropped("e1", "duplicate")]


def test_check_timeout_closes_only_idle_conversations() -> None:
    busy = user_turn(None, event("e1"))
    late = T0 + timedelta(seconds=601)
    assert check_timeout(busy.state, late, CFG).effects == []

    idle = respond(busy.state, answer(issued(busy)))
    assert check_timeout(idle.state, T0 + timedelta(seconds=599), CFG).effects == []
    timed_out = check_timeout(idle.state, T0 + timedelta(seconds=600), CFG)
    assert timed_out.effects == [Closed("timeout")]
    assert timed_out.state.status is ConversationStatus.TIMED_OUT
    assert check_timeout(timed_out.state, late, CFG).effects == []


def test_close_of_idle_conversation_takes_effect_at_once() -> None:
    t = user_turn(None, event("e1"))
    t = respond(t.state, answer(issued(t)))
    closed = on_close(t.state, event("x1", "user said bye", kind=ConversationEventKind.CLOSE), T0)

    assert closed.effects == [Closed("user said bye")]
    assert closed.state.status is ConversationStatus.CLOSED
    assert on_close(closed.state, event("x2", kind=ConversationEventKind.CLOSE), T0).effects == [
        Dropped("x2", "not_open")
    ]
    assert on_close(
        closed.state, event("x1", "", kind=ConversationEventKind.CLOSE), T0
    ).effects == [Dropped("x1", "duplicate")]


def test_close_waits_until_pending_and_queued_turns_are_answered() -> None:
    first = user_turn(None, event("e1"))
    second = user_turn(first.state, event("e2"))
    closing = on_close(second.state, event("x1", "", kind=ConversationEventKind.CLOSE), T0)
    assert closing.effects == []
    assert closing.state.status is ConversationStatus.OPEN

    r1 = respond(closing.state, answer(issued(first)))
    assert [type(e) for e in r1.effects] == [Deliver, IssueLLM]
    r2 = respond(r1.state, answer(issued(r1)))
    assert [type(e) for e in r2.effects] == [Deliver, Closed]
    assert r2.effects[1] == Closed("close")
    assert r2.state.status is ConversationStatus.CLOSED

    fresh = user_turn(r2.state, event("e3", "new topic"))
    assert [m.content for m in issued(fresh).messages] == ["new topic"]
    assert fresh.state.sessions == 2


def test_handoff_stops_llm_replies_and_records_user_turns() -> None:
    t = user_turn(None, event("e1"))
    t = respond(t.state, answer(issued(t)))
    handed = on_close(t.state, event("h1", "", kind=ConversationEventKind.HANDOFF), T0)
    assert handed.effects == [Closed("handoff")]

    during = user_turn(handed.state, event("e2", "a human please"))
    assert during.effects == [Dropped("e2", "handoff")]
    assert during.state.history[-1].content == "a human please"
    assert during.state.pending is None

    closed = on_close(during.state, event("x1", "", kind=ConversationEventKind.CLOSE), T0)
    assert closed.state.status is ConversationStatus.CLOSED


def test_on_close_rejects_turn_events() -> None:
    with pytest.raises(ValueError, match="close/handoff"):
        on_close(None, event("e1"), T0)


def test_non_user_turn_is_dropped() -> None:
    t = user_turn(None, event("e1", role=Role.ASSISTANT))
    assert t.effects == [Dropped("e1", "not_user_turn")]


def test_failed_response_with_apology_is_delivered_and_counted_as_fallback() -> None:
    t = user_turn(None, event("e1"))
    reply = respond(t.state, answer(issued(t), "Sorry, try later", LLMStatus.FAILED))
    assert delivered(reply).request.content == "Sorry, try later"
    assert reply.state.fallback_replies == 1


def test_empty_reply_ends_the_turn_without_delivery_and_issues_the_next() -> None:
    first = user_turn(None, event("e1"))
    second = user_turn(first.state, event("e2"))
    reply = respond(second.state, answer(issued(first), "", LLMStatus.FAILED))
    assert [type(e) for e in reply.effects] == [Dropped, IssueLLM]
    assert reply.effects[0] == Dropped("e1", "empty_reply")
    assert issued(reply).turn_id == "e2"


def test_reply_latency_is_measured_from_the_original_message() -> None:
    t = user_turn(None, event("e1", at=T0 - timedelta(milliseconds=250)))
    reply = respond(t.state, answer(issued(t)), now=T0 + timedelta(milliseconds=750))
    assert reply.state.total_reply_latency_ms == pytest.approx(1000.0)
    assert reply.state.last_engine == "local"


def test_replaying_an_input_on_the_same_state_repeats_the_same_effect_ids() -> None:
    first = user_turn(None, event("e1"))
    second = user_turn(first.state, event("e2"))
    a = respond(second.state, answer(issued(first)), now=T0 + timedelta(seconds=1))
    b = respond(second.state, answer(issued(first)), now=T0 + timedelta(seconds=2))
    assert delivered(a).request.delivery_id == delivered(b).request.delivery_id
    assert issued(a).request_id == issued(b).request_id == "e2:0"


# --- retention of ended conversations: when the table may forget a state ----------------------


def _closed_at(moment: datetime) -> ConversationState:
    t = user_turn(None, event("e1"))
    t = respond(t.state, answer(issued(t)), now=T0 + timedelta(seconds=5))
    closed = on_close(t.state, event("x1", "bye", kind=ConversationEventKind.CLOSE), moment)
    assert closed.state.status is ConversationStatus.CLOSED
    return closed.state


def test_closed_conversation_is_pruned_retention_after_its_close() -> None:
    closed_at = T0 + timedelta(seconds=10)
    closed = _closed_at(closed_at)

    assert ended_at(closed, CFG) == closed_at
    assert prune_at(closed, CFG) == closed_at + RETENTION
    assert not prune_due(closed, closed_at + RETENTION - timedelta(milliseconds=1), CFG)
    assert prune_due(closed, closed_at + RETENTION, CFG)
    # until it is pruned, a redelivered turn is still recognised and a late response dropped
    late = closed_at + RETENTION - timedelta(seconds=1)
    assert user_turn(closed, event("e1"), now=late).effects == [Dropped("e1", "duplicate")]
    request = issued(user_turn(None, event("e1")))
    assert respond(closed, answer(request), late).effects == [Dropped("e1:0", "duplicate")]


def test_close_that_waited_for_the_last_reply_counts_retention_from_that_reply() -> None:
    t = user_turn(None, event("e1"))
    closing = on_close(t.state, event("x1", kind=ConversationEventKind.CLOSE), T0)
    replied_at = T0 + timedelta(seconds=20)
    done = respond(closing.state, answer(issued(t)), now=replied_at)
    assert done.state.status is ConversationStatus.CLOSED
    assert prune_at(done.state, CFG) == replied_at + RETENTION


def test_timed_out_conversation_is_pruned_retention_after_it_timed_out() -> None:
    t = user_turn(None, event("e1"))
    idle = respond(t.state, answer(issued(t)), now=T0)
    timed_out = check_timeout(idle.state, T0 + timedelta(seconds=650), CFG).state
    assert timed_out.status is ConversationStatus.TIMED_OUT

    timeout = T0 + timedelta(seconds=600)  # last activity + inactivity_timeout_s
    assert ended_at(timed_out, CFG) == timeout
    assert prune_at(timed_out, CFG) == timeout + RETENTION
    assert not prune_due(timed_out, timeout + RETENTION - timedelta(milliseconds=1), CFG)
    assert prune_due(timed_out, timeout + RETENTION, CFG)


def test_open_active_closing_and_handed_off_conversations_are_never_pruned() -> None:
    much_later = T0 + timedelta(days=3650)
    pending = user_turn(None, event("e1"))
    active = respond(pending.state, answer(issued(pending)))
    closing = on_close(pending.state, event("x1", kind=ConversationEventKind.CLOSE), T0)
    handed = on_close(active.state, event("h1", kind=ConversationEventKind.HANDOFF), T0)
    assert closing.state.closing is ConversationStatus.CLOSED
    assert handed.state.status is ConversationStatus.HANDOFF
    for state in (pending.state, active.state, closing.state, handed.state):
        assert (ended_at(state, CFG), prune_at(state, CFG)) == (None, None)
        assert not prune_due(state, much_later, CFG)


def test_reopened_conversation_is_no_longer_due_for_pruning() -> None:
    closed = _closed_at(T0 + timedelta(seconds=10))
    later = T0 + RETENTION  # not yet pruned: the next session continues the conversation
    reopened = user_turn(closed, event("e2", at=later), now=later)
    assert reopened.state.sessions == 2
    assert prune_at(reopened.state, CFG) is None
    assert not prune_due(reopened.state, later + 2 * RETENTION, CFG)


def test_placeholder_of_an_unknown_conversation_is_pruned_like_a_closed_one() -> None:
    at = T0 + timedelta(seconds=7)
    close = event("x1", kind=ConversationEventKind.CLOSE)
    by_close = on_close(None, close, at).state
    request = issued(user_turn(None, event("e1")))
    by_response = on_llm_response(None, answer(request), cfg=CFG, now=at).state
    by_assistant_turn = user_turn(None, event("a1", role=Role.ASSISTANT), now=at).state
    for placeholder in (by_close, by_response, by_assistant_turn):
        assert (placeholder.status, placeholder.sessions) == (ConversationStatus.CLOSED, 0)
        assert prune_at(placeholder, CFG) == at + RETENTION
        assert prune_due(placeholder, at + RETENTION, CFG)
    # a placeholder remembers no id: whether it is stored or pruned, inputs behave the same
    assert on_close(by_close, close, at).effects == on_close(None, close, at).effects
    after = user_turn(by_close, event("e2"), now=at)
    fresh = user_turn(None, event("e2"), now=at)
    assert after.effects == fresh.effects
    assert (after.state.sessions, after.state.status) == (1, ConversationStatus.OPEN)


def test_state_round_trips_through_json() -> None:
    t = user_turn(None, event("e1", metadata={"k": "v"}))
    t = user_turn(t.state, event("e2"))
    restored = ConversationState.model_validate(
        json.loads(json.dumps(t.state.model_dump(mode="json")))
    )
    assert restored == t.state


# --- property: duplicates, reordering and re-issues never break order or exactly-once ---------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_user_turn_gets_exactly_one_reply_in_arrival_order(data: st.DataObject) -> None:
    n_turns = data.draw(st.integers(1, 10), label="turns")
    conversations = data.draw(
        st.lists(st.sampled_from(["c1", "c2", "c3"]), min_size=n_turns, max_size=n_turns)
    )
    copies = data.draw(st.lists(st.integers(1, 3), min_size=n_turns, max_size=n_turns))
    stream = [i for i, c in enumerate(copies) for _ in range(c)]
    stream = data.draw(st.permutations(stream), label="stream")

    states: dict[str, ConversationState] = {}
    pool: list[LLMResponse] = []  # responses produced by the simulated LLM pool
    in_flight: dict[str, set[str]] = defaultdict(set)  # issued, not yet answered turn ids
    arrival: dict[str, list[str]] = defaultdict(list)
    replies: dict[str, list[str]] = defaultdict(list)
    now, reissue_budget = T0, 4

    def apply(cid: str, t: Transition, before: ConversationState | None) -> None:
        dump = json.dumps(t.state.model_dump(mode="json"))
        states[cid] = ConversationState.model_validate(json.loads(dump))
        if before is not None:
            assert before.model_dump() == snapshot, "the given state was mutated"
        for effect in t.effects:
            if isinstance(effect, IssueLLM):
                in_flight[cid].add(effect.request.turn_id)
                dupes = data.draw(st.integers(1, 2), label="response copies")
                pool.extend([answer(effect.request)] * dupes)
            elif isinstance(effect, Deliver):
                replies[cid].append(effect.request.message_id)
                assert effect.request.content == f"answer to {effect.request.message_id}"
                in_flight[cid].discard(effect.request.message_id)
        assert len(in_flight[cid]) <= 1, "two turns of one conversation in flight"
        assert states[cid].pending is not None or not states[cid].queue

    while stream or pool:
        now += timedelta(seconds=data.draw(st.integers(0, 20), label="clock"))
        actions = (["turn"] if stream else []) + (["response"] if pool else [])
        actions += ["reissue"] if reissue_budget else []
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "turn":
            i = stream.pop(0)
            cid = conversations[i]
            if f"t{i}" not in arrival[cid]:
                arrival[cid].append(f"t{i}")
            before = states.get(cid)
            snapshot = before.model_dump() if before else None
            ev = event(f"t{i}", f"question {i}", conversation_id=cid, at=now)
            apply(cid, user_turn(before, ev, now=now), before)
        elif action == "response":
            response = pool.pop(data.draw(st.integers(0, len(pool) - 1), label="which"))
            before = states[response.conversation_id]
            snapshot = before.model_dump()
            apply(response.conversation_id, respond(before, response, now), before)
        else:
            reissue_budget -= 1
            cid = data.draw(st.sampled_from(sorted(states) or ["c1"]), label="reissue conv")
            if cid in states:
                before = states[cid]
                snapshot = before.model_dump()
                apply(cid, reissue_due(before, now + timedelta(seconds=31), CFG), before)

    assert dict(replies) == dict(arrival)
    assert all(s.pending is None and not s.queue for s in states.values())


def test_reply_delivery_ids_are_scoped_by_tenant_and_conversation_and_stable() -> None:
    """The delivery stage dedups on the delivery id for every tenant at once: two tenants
    reusing a message id (or one conversation id reused across tenants) must not share one,
    or the second reply is dropped as already delivered. A replay must give the same id."""

    def reply_id(tenant: str, conversation: str, message_id: str) -> str:
        ev = event(message_id, "hi").model_copy(
            update={"tenant": tenant, "conversation_id": conversation}
        )
        t = user_turn(None, ev)
        return delivered(respond(t.state, answer(issued(t), "ok"))).request.delivery_id

    ids = {
        reply_id("acme", "c1", "m-1"),
        reply_id("globex", "c1", "m-1"),
        reply_id("acme", "c2", "m-1"),
        reply_id("acme", "c1", "m-2"),
    }
    assert len(ids) == 4
    assert reply_id("acme", "c1", "m-1") == reply_id("acme", "c1", "m-1")


def test_a_turn_beyond_max_queued_turns_is_refused_and_the_state_kept() -> None:
    cfg = CFG.model_copy(update={"max_queued_turns": 2})
    t = user_turn(None, event("e1"), cfg=cfg)
    first = issued(t)
    t = user_turn(t.state, event("e2"), cfg=cfg)
    t = user_turn(t.state, event("e3"), cfg=cfg)
    assert [q.turn_id for q in t.state.queue] == ["e2", "e3"]

    full = user_turn(t.state, event("e4"), cfg=cfg)
    (refused,) = full.effects
    assert isinstance(refused, Refused)
    assert (refused.event_id, refused.error_type) == ("e4", "QueueFull")
    assert "2 turns waiting" in refused.reason
    assert "max_queued_turns" in refused.reason
    assert full.state == t.state  # not recorded: a replay decides the same way

    answered = on_llm_response(t.state, answer(first), cfg=cfg, now=T0)
    later = user_turn(answered.state, event("e5"), cfg=cfg)
    assert later.effects == []
    assert [q.turn_id for q in later.state.queue] == ["e3", "e5"]


def test_the_winning_escalated_response_hands_the_turn_off_with_its_reason() -> None:
    t = user_turn(None, event("e1", "I want to speak to a human", metadata={"k": "v"}))
    escalated = answer(issued(t), "A colleague will take over.", LLMStatus.ESCALATED)
    escalated = escalated.model_copy(update={"error": "escalation trigger 'human'"})

    r = respond(t.state, escalated, T0 + timedelta(seconds=2))
    assert [type(e) for e in r.effects] == [Deliver, HandOff, Closed]
    handoff = r.effects[1]
    assert isinstance(handoff, HandOff)
    ev = handoff.event
    assert (ev.event_id, ev.kind, ev.content) == (
        "e1:handoff",
        ConversationEventKind.HANDOFF,
        "I want to speak to a human",
    )
    assert (ev.tenant, ev.conversation_id, ev.sender) == ("acme", "c1", "+15550001")
    assert ev.metadata == {"k": "v", "handoff.reason": "escalation trigger 'human'"}
    assert r.effects[2] == Closed("handoff: escalation trigger 'human'")
    assert r.state.status is ConversationStatus.HANDOFF
    # the user's words are not the close reason (it goes to logs and analytics)
    assert "speak to a human" not in (r.state.close_reason or "")


def test_an_escalation_of_an_attempt_that_lost_the_turn_hands_nothing_off() -> None:
    """Attempt 0 is slow, the turn is re-issued, attempt 1 answers; attempt 0 then gives up
    and escalates. Before, the LLM stage sent a handoff event of its own that was applied to
    the conversation whatever response won: the answered conversation was handed off."""
    t = user_turn(None, event("e1"))
    first = issued(t)
    again = reissue_due(t.state, T0 + timedelta(seconds=31), CFG)
    won = respond(again.state, answer(issued(again)), T0 + timedelta(seconds=32))
    assert [type(e) for e in won.effects] == [Deliver]

    late = respond(won.state, answer(first, "A human will help.", LLMStatus.ESCALATED))
    assert late.effects == [Dropped("e1:0", "duplicate")]
    assert late.state.status is ConversationStatus.ACTIVE
    assert late.state.closing is None


def test_a_close_the_user_asked_for_wins_over_a_later_escalation() -> None:
    t = user_turn(None, event("e1", "I want a human"))
    closing = on_close(t.state, event("x1", "bye", kind=ConversationEventKind.CLOSE), T0)
    assert closing.effects == []

    r = respond(closing.state, answer(issued(t), "A human will help.", LLMStatus.ESCALATED))
    assert [type(e) for e in r.effects] == [Deliver, HandOff, Closed]
    assert r.effects[2] == Closed("bye")
    assert r.state.status is ConversationStatus.CLOSED
