"""Timer ticks: when a conversation is next due, the index the timer reads, and what the
stage does with a tick for a conversation ended longer than the retention."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY
from support.records import consumed

from processors.config import ConversationConfig, PersonaConfig, SwitchboardConfig
from processors.conversation import (
    check_timeout,
    next_due_at,
    on_user_turn,
    prune_at,
)
from processors.conversation_state import (
    ConversationState,
    ConversationStatus,
)
from processors.preprocess import conversation_key
from schemas.models import ConversationEvent, ConversationEventKind, utcnow
from streams.agents.conversation import Batch, DueIndex, _handle
from streams.agents.due import COMPACT_SLACK, DueKind, due_kind
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


def test_over_the_limit_live_ticks_go_first_and_the_rest_wait() -> None:
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


async def test_index_rescans_the_table_only_when_invalidated_or_stale() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    table = _Entries()
    table.entries.append((0, b"a", _state("a", pending=True)))
    await index.rescan(table, T0)
    table.entries.append((1, b"r", _state("r", pending=True)))  # restored from the changelog
    await index.rescan(table, T0 + timedelta(seconds=1))  # not invalidated, not stale
    assert index.take_due(T0 + timedelta(seconds=61), retry_s=5) == [(b"a", "t", "a")]
    index.invalidate()  # the table's partitions changed
    await index.rescan(table, T0 + timedelta(seconds=2))
    due = index.take_due(T0 + timedelta(seconds=61), retry_s=5)
    assert sorted(due) == [(b"a", "t", "a"), (b"r", "t", "r")]
    table.entries.clear()  # partitions dropped
    await index.rescan(table, T0 + timedelta(seconds=3700))  # stale: rescanned
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
    return consumed("conversations", 0, 0, rt.codec.encode(tick), key=key)


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


def _closed(conversation: str, ended: datetime) -> ConversationState:
    """A conversation closed at ``ended``: due for pruning ``ended_retention_s`` later."""
    return _state(conversation, pending=False).model_copy(
        update={"status": "closed", "last_activity_at": ended, "conversation_id": conversation}
    )


def test_due_kind_follows_next_due_at() -> None:
    assert due_kind(_state("a", pending=True)) is DueKind.LIVE  # LLM deadline
    assert due_kind(_state("a", pending=False)) is DueKind.LIVE  # inactivity timeout
    handoff = _state("a", pending=False).model_copy(update={"status": "handoff"})
    assert due_kind(handoff) is DueKind.LIVE
    closed = _state("a", pending=False).model_copy(update={"status": "closed"})
    assert due_kind(closed) is DueKind.PRUNE
    assert next_due_at(closed, CFG) == prune_at(closed, CFG)
    timed_out = closed.model_copy(update={"status": "timed_out"})
    assert due_kind(timed_out) is DueKind.PRUNE
    assert next_due_at(timed_out, CFG) == prune_at(timed_out, CFG)


def test_a_reissue_beats_a_backlog_of_prunes_which_drains_oldest_first() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    long_ago = T0 - timedelta(days=2)
    prunes = 5_000
    for n in range(prunes):  # inserted newest first, so insertion order is not due order
        index.update(f"old{n}".encode(), _closed(f"o{n}", long_ago - timedelta(seconds=n)))
    index.update(b"new", _state("new", pending=True))
    reissue_at = T0 + timedelta(seconds=61)  # the pending turn's LLM deadline just passed

    takes = []
    while batch := index.take_due(reissue_at, retry_s=600, limit=2_000):
        takes.append(batch)
    assert [len(batch) for batch in takes] == [2_000, 2_000, 1_001]
    assert takes[0][0] == (b"new", "t", "new")
    taken = [key for batch in takes for key, _, _ in batch]
    assert len(taken) == len(set(taken)) == prunes + 1  # none lost, none twice
    # oldest first: old4999 ended earliest
    assert taken[1:] == [f"old{n}".encode() for n in reversed(range(prunes))]

    assert index.take_due(reissue_at + timedelta(seconds=599), retry_s=600) == []
    again = index.take_due(reissue_at + timedelta(seconds=600), retry_s=600, limit=2_000)
    assert again[0] == (b"new", "t", "new")  # re-armed: asked again after retry_s, live first
    assert len(again) == 2_000


def test_stale_heap_items_are_skipped() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    index.update(b"a", _state("a", pending=False))  # inactivity timeout at T0 + 600 s
    later = _state("a", pending=False).model_copy(
        update={"last_activity_at": T0 + timedelta(seconds=300)}
    )
    index.update(b"a", later)  # active again: due at T0 + 900 s
    assert index.take_due(T0 + timedelta(seconds=600), retry_s=5) == []
    assert index.take_due(T0 + timedelta(seconds=900), retry_s=5) == [(b"a", "t", "a")]

    index.update(b"b", _state("b", pending=True))
    index.update(b"b", None)  # deleted
    assert index.take_due(T0 + timedelta(days=365), retry_s=5) == [(b"a", "t", "a")]
    assert len(index) == 1

    index.update(b"c", _state("c", pending=True))  # live, due at T0 + 60 s
    index.update(b"c", _closed("c", T0 - timedelta(seconds=3540)))  # prune, also T0 + 60 s
    assert index.heap_sizes()[DueKind.PRUNE] == 1
    d = _state("d", pending=True)
    assert d.pending is not None
    pending = d.pending.model_copy(update={"issued_at": T0 + timedelta(seconds=1)})
    index.update(b"d", d.model_copy(update={"pending": pending}))  # live, due at T0 + 61 s
    # c's live item has c's time but not its kind any more: stale, c waits behind d
    now = T0 + timedelta(seconds=61)
    assert index.take_due(now, retry_s=5, limit=1) == [(b"d", "t", "d")]
    assert index.take_due(now, retry_s=5, limit=1) == [(b"c", "t", "c")]
    assert index.take_due(now, retry_s=5, limit=1) == []


def test_a_key_with_two_equal_heap_items_is_returned_once() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    first = _state("a", pending=False)
    index.update(b"a", first)  # A
    index.update(b"a", first.model_copy(update={"last_activity_at": T0 + timedelta(days=1)}))
    index.update(b"a", first)  # A again: two items (T0 + 600 s, a)
    now = T0 + timedelta(seconds=600)
    assert index.take_due(now, retry_s=0, limit=10) == [(b"a", "t", "a")]
    assert index.take_due(now, retry_s=0, limit=10) == [(b"a", "t", "a")]  # re-armed at now


def test_heaps_stay_bounded_under_repeated_updates_and_rearms() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    keys = [b"a", b"b", b"c"]
    state = _state("x", pending=False)
    for n in range(20_000):
        moved = state.model_copy(update={"last_activity_at": T0 + timedelta(seconds=n)})
        index.update(keys[n % 3], moved)
        live, prune = index.heap_sizes()
        assert live <= 2 * len(keys) + COMPACT_SLACK
        assert prune == 0
    for n in range(3):  # the same keys end: their live items go stale, prune items come
        index.update(keys[n], _closed(f"c{n}", T0))
    for n in range(5_000):  # due and re-armed over and over
        assert len(index.take_due(T0 + timedelta(days=1, seconds=n), retry_s=1)) == 3
        live, prune = index.heap_sizes()
        assert live <= 2 * len(keys) + COMPACT_SLACK
        assert prune <= 2 * len(keys) + COMPACT_SLACK
    assert len(index) == 3


async def test_rescan_yields_to_the_loop_and_keeps_updates_made_meanwhile() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    table = _Entries()
    for n in range(5_000):  # idle open sessions, due at T0 + 600 s
        table.entries.append((0, f"k{n}".encode(), _state(f"k{n}", pending=False)))
    ran: list[int] = []

    async def commit_meanwhile() -> None:  # a batch committed while the rescan yields
        ran.append(len(index))
        active = _state("k0", pending=False).model_copy(
            update={"last_activity_at": T0 + timedelta(seconds=1000)}
        )
        index.update(b"k0", active)  # scanned before this update: due at T0 + 1600 s now
        index.update(b"k4999", None)  # pruned, not scanned yet (the table lags here)

    task = asyncio.create_task(commit_meanwhile())
    await index.rescan(table, T0)
    assert ran, "the rescan never let another task run"
    await task

    due = {key for key, _, _ in index.take_due(T0 + timedelta(seconds=600), retry_s=3600)}
    assert len(due) == 4_998
    assert b"k0" not in due  # the rescan did not bring back its stale due time
    assert b"k4999" not in due  # nor the deleted key
    assert index.take_due(T0 + timedelta(seconds=1600), retry_s=3600) == [(b"k0", "t", "k0")]


class _CountingEntries:
    """Lists its entries one at a time and remembers how many it has listed."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes, ConversationState]] = []
        self.listed = 0

    def items(self) -> Iterator[tuple[int, bytes, ConversationState]]:
        for entry in list(self.entries):
            self.listed += 1
            yield entry


async def test_rescan_yields_at_least_every_thousand_states() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    table = _CountingEntries()
    for n in range(5_000):
        table.entries.append((0, f"k{n}".encode(), _state(f"k{n}", pending=False)))
    seen: list[int] = []
    done = False

    async def watch() -> None:  # records how far the rescan got each time it yields
        while not done:
            seen.append(table.listed)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)  # the watcher starts
    await index.rescan(table, T0)
    done = True
    await watcher
    gaps = [b - a for a, b in itertools.pairwise([0, *seen, 5_000])]
    assert max(gaps) <= 1_000
    assert len(index) == 5_000


async def test_a_partition_change_during_a_rescan_makes_the_next_call_scan_again() -> None:
    index = DueIndex(CFG, rescan_s=3600)
    table = _Entries()
    for n in range(3_000):
        table.entries.append((0, f"k{n}".encode(), _state(f"k{n}", pending=False)))

    async def rebalance() -> None:  # a partition restored while the rescan runs
        table.entries.append((1, b"r", _state("r", pending=True)))
        index.invalidate()

    task = asyncio.create_task(rebalance())
    await index.rescan(table, T0)
    await task
    await index.rescan(table, T0 + timedelta(seconds=1))  # invalidated meanwhile: scans again
    assert index.take_due(T0 + timedelta(seconds=61), retry_s=5) == [(b"r", "t", "r")]
