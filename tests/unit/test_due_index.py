"""Timer ticks: when a conversation is next due, and the index the timer reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from processors.config import ConversationConfig, PersonaConfig
from processors.conversation import (
    next_due_at,
    on_user_turn,
)
from processors.conversation_state import (
    ConversationState,
)
from schemas.models import ConversationEvent
from streams.agents.conversation import DueIndex

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CFG = ConversationConfig(llm_deadline_s=60, inactivity_timeout_s=600)


def _state(conversation: str, *, pending: bool) -> ConversationState:
    event = ConversationEvent(
        event_id=f"{conversation}-m1",
        conversation_id=conversation,
        tenant="t",
        content="hi",
        origin_created_at=T0,
        created_at=T0,
    )
    state = on_user_turn(
        None,
        event,
        persona="p",
        override_continuity=False,
        continuity=True,
        cfg=CFG,
        personas={"p": PersonaConfig(name="P")},
        now=T0,
    ).state
    if pending:
        return state
    return state.model_copy(update={"pending": None})


def test_pending_turn_is_due_at_its_llm_deadline() -> None:
    assert next_due_at(_state("a", pending=True), CFG) == T0 + timedelta(seconds=60)


def test_idle_open_session_is_due_at_its_inactivity_timeout() -> None:
    assert next_due_at(_state("a", pending=False), CFG) == T0 + timedelta(seconds=600)


def test_ended_session_is_never_due() -> None:
    ended = _state("a", pending=False).model_copy(update={"status": "timed_out"})
    assert next_due_at(ended, CFG) is None


def test_index_returns_due_keys_once_per_retry_window_and_follows_updates() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    index.update(b"a", _state("a", pending=True))
    index.update(b"b", _state("b", pending=False))
    assert index.take_due(T0 + timedelta(seconds=59), retry_s=5) == []
    assert index.take_due(T0 + timedelta(seconds=61), retry_s=5) == [(b"a", "t", "a")]
    assert index.take_due(T0 + timedelta(seconds=62), retry_s=5) == []  # asked again later
    assert index.take_due(T0 + timedelta(seconds=67), retry_s=5) == [(b"a", "t", "a")]
    ended = _state("a", pending=False).model_copy(update={"status": "closed"})
    index.update(b"a", ended)
    assert index.take_due(T0 + timedelta(seconds=700), retry_s=5) == [(b"b", "t", "b")]


class _Entries:
    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes, ConversationState]] = []

    def items(self) -> list[tuple[int, bytes, ConversationState]]:
        return list(self.entries)


def test_index_rescans_the_table_only_when_invalidated_or_stale() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    table = _Entries()
    table.entries.append((0, b"a", _state("a", pending=True)))
    index.rescan(table, T0)
    table.entries.append((1, b"r", _state("r", pending=True)))  # restored from the changelog
    index.rescan(table, T0 + timedelta(seconds=1))  # not invalidated, not stale: no rescan
    assert index.take_due(T0 + timedelta(seconds=61), retry_s=5) == [(b"a", "t", "a")]
    index.invalidate()  # the table's partitions changed
    index.rescan(table, T0 + timedelta(seconds=2))
    due = index.take_due(T0 + timedelta(seconds=61), retry_s=5)
    assert sorted(due) == [(b"a", "t", "a"), (b"r", "t", "r")]
    table.entries.clear()  # partitions dropped
    index.rescan(table, T0 + timedelta(seconds=3700))  # stale: rescanned
    assert index.take_due(T0 + timedelta(days=1), retry_s=5) == []


def test_each_reissue_gets_twice_the_deadline_of_the_one_before() -> None:
    from processors.conversation import deadline_s, reissue_due

    state = _state("a", pending=True)
    assert [deadline_s(n, CFG) for n in range(6)] == [60, 120, 240, 480, 960, 960]
    first = reissue_due(state, T0 + timedelta(seconds=61), CFG)
    assert first.state.pending is not None
    assert first.state.pending.attempt == 1
    issued = T0 + timedelta(seconds=61)
    assert reissue_due(first.state, issued + timedelta(seconds=119), CFG).effects == []
    assert len(reissue_due(first.state, issued + timedelta(seconds=121), CFG).effects) == 1
    assert next_due_at(first.state, CFG) == issued + timedelta(seconds=120)
