"""Timer ticks: when a conversation is next due, the index the timer reads, and what the
stage does with a tick for a conversation ended longer than the retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from processors.config import ConversationConfig, PersonaConfig, SwitchboardConfig
from processors.conversation import (
    check_timeout,
    next_due_at,
    on_user_turn,
)
from processors.conversation_state import (
    ConversationState,
    ConversationStatus,
)
from processors.preprocess import conversation_key
from schemas.models import ConversationEvent, ConversationEventKind, utcnow
from streams.agents.conversation import Batch, DueIndex, _handle
from streams.runtime import Runtime
from streams.settings import Settings

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CFG = ConversationConfig(llm_deadline_s=60, inactivity_timeout_s=600, ended_retention_s=3600)


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


def test_closed_session_is_due_when_its_retention_ends() -> None:
    closed = _state("a", pending=False).model_copy(update={"status": "closed"})
    assert next_due_at(closed, CFG) == T0 + timedelta(seconds=3600)


def test_timed_out_session_is_due_retention_after_it_timed_out() -> None:
    timed_out = _state("a", pending=False).model_copy(update={"status": "timed_out"})
    assert next_due_at(timed_out, CFG) == T0 + timedelta(seconds=600 + 3600)


def test_idle_handoff_is_due_at_its_inactivity_timeout_and_then_times_out() -> None:
    handoff = _state("a", pending=False).model_copy(update={"status": "handoff"})
    due = next_due_at(handoff, CFG)
    assert due == T0 + timedelta(seconds=600)
    timed = check_timeout(handoff, due, CFG)
    assert timed.state.status is ConversationStatus.TIMED_OUT
    assert next_due_at(timed.state, CFG) == T0 + timedelta(seconds=600 + 3600)


def test_index_forgets_a_deleted_key() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    closed = _state("a", pending=False).model_copy(update={"status": "closed"})
    index.update(b"a", closed)
    index.update(b"b", closed.model_copy(update={"conversation_id": "b"}))
    index.update(b"a", None)  # pruned: deleted from the table
    assert index.take_due(T0 + timedelta(days=1), retry_s=5) == [(b"b", "t", "b")]


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


def test_over_the_limit_the_most_recently_due_go_first_and_the_rest_wait() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    long_ago = T0 - timedelta(days=2)
    closed = _state("old", pending=False).model_copy(
        update={"status": "closed", "last_activity_at": long_ago}
    )
    for n in range(3):  # a backlog of prunes, due for two days
        index.update(f"old{n}".encode(), closed.model_copy(update={"conversation_id": f"o{n}"}))
    index.update(b"new", _state("new", pending=True))
    reissue_at = T0 + timedelta(seconds=61)  # the pending turn's LLM deadline just passed

    first = index.take_due(reissue_at, retry_s=600, limit=2)
    assert first[0] == (b"new", "t", "new")
    assert len(first) == 2
    rest = index.take_due(reissue_at, retry_s=600, limit=2)
    assert len(rest) == 2
    assert {k for k, _, _ in first + rest} == {b"new", b"old0", b"old1", b"old2"}


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


class _Table:
    """The part of ``ChangelogTable`` a ``Batch`` uses; records what it was asked to store."""

    def __init__(self, entries: dict[bytes, ConversationState]) -> None:
        self.entries = entries
        self.changes: list[tuple[int, bytes, ConversationState | None]] = []

    def get(self, partition: int, key: bytes) -> ConversationState | None:
        return self.entries.get(key)

    def put_many(self, changes: list[tuple[int, bytes, ConversationState | None]]) -> None:
        self.changes.extend(changes)


def _tick_record(rt: Runtime, key: bytes, conversation: str) -> ConsumerRecord[bytes, bytes]:
    now = utcnow()
    tick = ConversationEvent(
        event_id="tick:1",
        conversation_id=conversation,
        tenant="t",
        kind=ConversationEventKind.TIMEOUT,
        origin_created_at=now,
        created_at=now,
    )
    value = rt.codec.encode(tick)
    return ConsumerRecord(
        topic="conversations",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        headers=[],
    )


def _tick_closed_conversation(tmp_path: Path, ended_ago: timedelta) -> tuple[_Table, DueIndex]:
    """Handle a tick for a conversation closed ``ended_ago`` before now (retention: 1 h)."""
    config = SwitchboardConfig.model_validate(
        {
            "personas": {"p": {"name": "P"}},
            "routing": {"default_persona": "p"},
            "conversation": CFG.model_dump(),
        }
    )
    rt = Runtime(Settings(data_dir=tmp_path), config)
    key = conversation_key("t", "a").encode()
    closed = _state("a", pending=False).model_copy(
        update={"status": "closed", "last_activity_at": utcnow() - ended_ago}
    )
    table = _Table({key: closed})
    index = DueIndex(CFG, rescan_s=3600)
    index.update(key, closed)
    batch = Batch(table, index)  # type: ignore[arg-type]  # a stand-in for ChangelogTable
    topics: dict[str, Any] = {}  # a prune sends nothing
    asyncio.run(_handle(rt, topics, batch, _tick_record(rt, key, "a")))
    batch.commit()
    return table, index


def _pruned_count() -> float:
    labels = {"stage": "conversation", "reason": "pruned"}
    return REGISTRY.get_sample_value("switchboard_dropped_total", labels) or 0.0


def test_tick_deletes_a_conversation_ended_longer_than_the_retention(tmp_path: Path) -> None:
    before = _pruned_count()
    table, index = _tick_closed_conversation(tmp_path, timedelta(seconds=3601))
    key = conversation_key("t", "a").encode()
    assert table.changes == [(0, key, None)]  # None: delete, a tombstone in the changelog
    assert index.take_due(utcnow() + timedelta(days=365), retry_s=5) == []
    assert _pruned_count() == before + 1


def test_tick_keeps_a_conversation_ended_within_the_retention(tmp_path: Path) -> None:
    table, index = _tick_closed_conversation(tmp_path, timedelta(seconds=3000))
    assert table.changes == []
    assert [key for key, _, _ in index.take_due(utcnow() + timedelta(hours=1), retry_s=5)] == [
        conversation_key("t", "a").encode()
    ]
