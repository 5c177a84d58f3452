"""A table restore cut short by a revoke leaves the table as it was.

The restore runs beside the stage (``BatchConsumer._run_hook``), not in aiokafka's assignment
callback; a revoke cancels it. Here the real ``ChangelogTable`` and the conversation stage's
real ``on_assigned`` hook restore from an in-memory changelog: ``streams.table``'s
``AIOKafkaConsumer`` and the worker's producer are replaced, and the restore consumer stops
in the middle of its read until the test lets it go on. aiokafka's ``pause``/``resume`` on the
stage's consumer are recorded.
"""

from __future__ import annotations

import asyncio
import gc
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from support.records import consumed

from processors.config import ConversationConfig, PersonaConfig, SwitchboardConfig
from processors.conversation import on_user_turn
from processors.conversation_state import ConversationState
from processors.preprocess import conversation_key
from schemas.models import ConversationEvent, utcnow
from streams.agents import conversation
from streams.agents.due import DueIndex
from streams.runtime import Runtime
from streams.settings import Settings
from streams.table import ChangelogTable
from streams.transport import BatchConsumer

CHANGELOG = "cl"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


class Changelog:
    """In-memory changelog partitions: what the producer stand-in writes and the restore
    consumer stand-in reads. ``hold()`` makes the next reads stop after one record until
    ``release()``; ``blocked`` is set while a read waits there."""

    def __init__(self) -> None:
        self.partitions: dict[int, list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self.released = asyncio.Event()
        self.released.set()
        self.blocked = asyncio.Event()
        self.consumers: list[RestoreConsumer] = []
        self.free_reads = 0

    def append(self, partition: int, key: bytes | None, value: bytes | None) -> int:
        self.partitions[partition].append((key, value))
        return len(self.partitions[partition]) - 1

    def hold(self, after_reads: int = 0) -> None:
        """Make reads return one record each; all but the first ``after_reads`` of them then
        wait for ``release()``."""
        self.released.clear()
        self.blocked.clear()
        self.free_reads = after_reads

    def release(self) -> None:
        self.released.set()

    def consumer(self, **_: Any) -> RestoreConsumer:
        made = RestoreConsumer(self)
        self.consumers.append(made)
        return made


class RestoreConsumer:
    """Stands in for the restore's ``AIOKafkaConsumer``: reads ``Changelog`` partitions."""

    def __init__(self, log: Changelog) -> None:
        self.log = log
        self.position: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[int, int]] = []
        self.stopped = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, tps: list[TopicPartition]) -> None:
        self.position = dict.fromkeys(tps, 0)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.position[tp] = 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset
        self.seeks.append((tp.partition, offset))

    async def getmany(self, *tps: TopicPartition, **_: Any) -> dict[TopicPartition, list[Any]]:
        limit = None if self.log.released.is_set() else 1
        fetched: dict[TopicPartition, list[Any]] = {}
        for tp in tps:
            records = self.log.partitions[tp.partition][self.position[tp] :][:limit]
            if records:
                first = self.position[tp]
                fetched[tp] = [
                    consumed(tp.topic, tp.partition, first + n, value, key=key)
                    for n, (key, value) in enumerate(records)
                ]
                self.position[tp] = first + len(records)
        if not self.log.released.is_set() and self.log.free_reads:
            self.log.free_reads -= 1
        elif not self.log.released.is_set():
            self.log.blocked.set()
            await self.log.released.wait()  # the restore is in the middle of its read
        return fetched


class Producer:
    """The worker's producer, writing to a ``Changelog`` (acknowledged at once)."""

    max_request_size = 1 << 20

    def __init__(self, log: Changelog) -> None:
        self.log = log

    def limit(self, topic: str) -> int:
        return self.max_request_size

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Any = None,
    ) -> asyncio.Future[Any]:
        assert topic == CHANGELOG
        assert partition is not None
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(SimpleNamespace(offset=self.log.append(partition, key, value)))
        return ack


@pytest.fixture(autouse=True)
def _thaw() -> Iterator[None]:
    """Give back to the collector what a test's conversation hook froze (``gc.freeze``)."""
    frozen = gc.get_freeze_count()
    yield
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Iterator[Changelog]:
    changelog = Changelog()
    monkeypatch.setattr("streams.table.AIOKafkaConsumer", changelog.consumer)
    yield changelog
    changelog.release()


def _recording(consumer: BatchConsumer) -> list[str]:
    """Record ``pause``/``resume`` of the stage's aiokafka consumer (never started here)."""
    calls: list[str] = []

    def pause(*tps: TopicPartition) -> None:
        calls.append(f"pause {sorted((tp.topic, tp.partition) for tp in tps)}")

    def resume(tp: TopicPartition) -> None:
        calls.append(f"resume {tp.topic}[{tp.partition}]")

    client: Any = consumer.consumer
    client.pause, client.resume = pause, resume
    return calls


async def _hook_done(consumer: BatchConsumer) -> None:
    assert consumer._hook_task is not None
    await asyncio.wait_for(consumer._hook_task, 2)


async def test_a_revoke_during_a_restore_cancels_it_and_the_table_keeps_nothing_of_it(
    log: Changelog,
) -> None:
    table: ChangelogTable[str] = ChangelogTable(
        Settings(), Producer(log), CHANGELOG, encode=str.encode, decode=bytes.decode
    )

    async def restore(tps: set[TopicPartition]) -> None:
        await table.restore({tp.partition for tp in tps})

    stage = BatchConsumer(Settings(), "test", ["in"], _no_batches, on_assigned=restore)
    calls = _recording(stage)
    tps = {TopicPartition("in", p) for p in (0, 1)}
    log.append(0, b"a", b"a-old")
    await stage._assigned({TopicPartition("in", 0)})
    await _hook_done(stage)
    assert table.get(0, b"a") == "a-old"
    position = dict(table._position)
    await stage._revoked({TopicPartition("in", 0)})
    # Meanwhile another worker changed partition 0, and partition 1 has state of its own.
    log.append(0, b"a", b"a-new")
    log.append(1, b"b", b"b-1")
    log.append(1, b"c", b"c-1")

    log.hold()
    await stage._assigned(tps)
    await asyncio.wait_for(log.blocked.wait(), 2)  # the restore read one record, then waits
    await asyncio.wait_for(stage._revoked(tps), timeout=1)

    assert stage._hook_task is None
    assert table.partitions() == {0}  # partition 1 not half restored
    assert table.get(0, b"a") == "a-old"  # partition 0 not half caught up
    assert table.get(1, b"b") is None
    assert table._position == position  # the next catch-up reads from the same place
    assert all(c.stopped for c in log.consumers)  # the cancelled restore closed its consumer
    assert stage.assigned == set()
    assert calls == ["pause [('in', 0)]", "resume in[0]", "pause [('in', 0), ('in', 1)]"]

    log.release()
    await stage._assigned(tps)  # the next assignment restores what the cancelled one missed
    await _hook_done(stage)
    assert (table.get(0, b"a"), table.get(1, b"b"), table.get(1, b"c")) == ("a-new", "b-1", "c-1")
    assert stage.assigned == tps


async def _cut_short(table: ChangelogTable[str], log: Changelog, reads: int) -> None:
    """Start a restore of partition 1, cancel it after ``reads`` reads, let the log go on."""
    log.hold(after_reads=reads)
    restore = asyncio.create_task(table.restore({1}))
    await asyncio.wait_for(log.blocked.wait(), 2)
    restore.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restore
    log.release()


async def test_the_next_restore_goes_on_where_a_cancelled_one_stopped(
    log: Changelog, monkeypatch: pytest.MonkeyPatch
) -> None:
    table: ChangelogTable[str] = ChangelogTable(
        Settings(), Producer(log), CHANGELOG, encode=str.encode, decode=bytes.decode
    )
    for key, value in [(b"a", b"a-1"), (b"b", b"b-1"), (b"a", b"a-2"), (b"c", b"c-1")]:
        log.append(1, key, value)
    await _cut_short(table, log, reads=3)  # three records read, then cancelled
    assert table.partitions() == set()  # nothing applied
    # Meanwhile the owner changed it: a key read before is deleted, another written again.
    log.append(1, b"b", None)
    log.append(1, b"c", b"c-2")

    # the three read before, then c-1 (the read it waited in) and the two new ones
    assert await table.restore({1}) == 6
    assert log.consumers[-1].seeks == [(1, 3)]  # on from the fourth record
    assert {k: table.get(1, k) for k in (b"a", b"b", b"c")} == {
        b"a": "a-2",
        b"b": None,
        b"c": "c-2",
    }
    assert table._partial == {}


async def test_what_a_cut_short_restore_read_is_not_resumed_once_stale(
    log: Changelog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``RESUME_WITHIN_S`` compaction may have dropped a tombstone: read it all again."""
    table: ChangelogTable[str] = ChangelogTable(
        Settings(), Producer(log), CHANGELOG, encode=str.encode, decode=bytes.decode
    )
    log.append(1, b"a", b"a-1")
    log.append(1, b"b", b"b-1")
    await _cut_short(table, log, reads=2)
    monkeypatch.setattr("streams.table.RESUME_WITHIN_S", 0.0)
    # Compaction ran: the changelog lost "a" (as if its tombstone had come and gone too).
    log.partitions[1][0] = (b"b", b"b-1")

    assert await table.restore({1}) == 2
    assert log.consumers[-1].seeks == []  # from the beginning
    assert (table.get(1, b"a"), table.get(1, b"b")) == (None, "b-1")


class Clock:
    """``streams.table``'s ``time``, its monotonic clock set by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now


async def test_resuming_does_not_extend_how_long_a_read_may_be_resumed(
    log: Changelog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit runs from the first read: a chain of cut-short restores may not carry
    values read longer ago than ``RESUME_WITHIN_S`` (a tombstone may be compacted away)."""
    clock = Clock()
    monkeypatch.setattr("streams.table.time", clock)
    table: ChangelogTable[str] = ChangelogTable(
        Settings(), Producer(log), CHANGELOG, encode=str.encode, decode=bytes.decode
    )
    for n in range(6):
        log.append(1, b"k%d" % n, b"v")
    await _cut_short(table, log, reads=2)  # at 0 s
    clock.now = 500.0
    await _cut_short(table, log, reads=2)  # resumed at 500 s, cut short again
    assert table._partial[1].read_since == 0.0
    clock.now = 700.0
    table.drop(set())  # any drop forgets what is too old to resume
    assert table._partial == {}


async def _no_batches(records: list[Any]) -> None:
    raise AssertionError("no batch is handled in these tests")


def _state(conversation_id: str, content: str) -> ConversationState:
    event = ConversationEvent(
        event_id=f"{conversation_id}-{content}",
        conversation_id=conversation_id,
        tenant="t",
        content=content,
        origin_created_at=T0,
        created_at=T0,
    )
    return on_user_turn(
        None,
        event,
        persona="p",
        override_continuity=False,
        continuity=True,
        cfg=ConversationConfig(),
        personas={"p": PersonaConfig(name="P")},
        now=T0,
    ).state


def _conversation_stage(
    log: Changelog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[BatchConsumer, ChangelogTable[ConversationState], DueIndex]:
    """The real conversation stage on ``log`` (topics ``conv`` and ``resp``), with the table
    and the timer's index it made."""
    tables: list[ChangelogTable[ConversationState]] = []
    indexes: list[DueIndex] = []

    class RecordingTable(ChangelogTable[ConversationState]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            tables.append(self)

    class RecordingIndex(DueIndex):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            indexes.append(self)

    monkeypatch.setattr(conversation, "ChangelogTable", RecordingTable)
    monkeypatch.setattr(conversation, "DueIndex", RecordingIndex)
    monkeypatch.setattr(conversation, "changelog_topic", lambda settings: CHANGELOG)
    config = SwitchboardConfig.model_validate(
        {"personas": {"p": {"name": "P"}}, "routing": {"default_persona": "p"}}
    )
    rt = Runtime(Settings(data_dir=tmp_path), config)
    rt.kafka = Producer(log)  # type: ignore[assignment]
    stage, _ = conversation.stage(rt, {"conversations": "conv", "llm_responses": "resp"})
    _recording(stage)
    (table,), (index,) = tables, indexes
    return stage, table, index


async def test_the_conversation_hook_drops_and_restores_right_around_a_cancelled_restore(
    log: Changelog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assigned {0, 1}, then {1, 2} (restore cancelled by a revoke), then {0, 1} again: the
    cancelled round drops partition 0 and restores nothing; the last one rebuilds 0 and
    catches 1 up; the timer's index is rebuilt after each round, the cancelled one too."""
    stage, table, index = _conversation_stage(log, tmp_path, monkeypatch)
    key = {p: conversation_key("t", f"c{p}").encode() for p in range(3)}
    for p in range(3):
        log.append(p, key[p], _state(f"c{p}", "first").model_dump_json().encode())

    def assignment(*partitions: int) -> set[TopicPartition]:
        return {TopicPartition(t, p) for t in ("conv", "resp") for p in partitions}

    def contents(p: int) -> str | None:
        state = table.get(p, key[p])
        return None if state is None else state.history[-1].content

    await stage._assigned(assignment(0, 1))
    await _hook_done(stage)
    assert table.partitions() == {0, 1}
    await index.rescan(table, utcnow())
    assert len(index) == 2
    await stage._revoked(assignment(0, 1))
    log.append(1, key[1], _state("c1", "second").model_dump_json().encode())

    log.hold()
    await stage._assigned(assignment(1, 2))
    await asyncio.wait_for(log.blocked.wait(), 2)
    await asyncio.wait_for(stage._revoked(assignment(1, 2)), timeout=1)

    assert table.partitions() == {1}  # 0 dropped; 2 not restored; 1 kept as it was
    assert contents(1) == "first"
    assert index._scanned_at is None  # the next timer round forgets partition 0's key
    await index.rescan(table, utcnow())
    assert len(index) == 1

    log.release()
    await stage._assigned(assignment(0, 1))
    await _hook_done(stage)
    assert table.partitions() == {0, 1}
    assert (contents(0), contents(1)) == ("first", "second")
    assert stage.assigned == assignment(0, 1)


async def test_the_states_a_restore_loaded_are_left_out_of_every_full_collection(
    log: Changelog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection walks every tracked object: with 200,000 restored states it stalled
    the worker for 1.6 s (BENCHMARKS.md). The hook freezes what the first restore loaded, and
    only the first: each freeze keeps the cycles alive at that moment forever."""
    stage, table, _ = _conversation_stage(log, tmp_path, monkeypatch)
    key = {p: conversation_key("t", f"c{p}").encode() for p in range(2)}
    for p in range(2):
        log.append(p, key[p], _state(f"c{p}", "first").model_dump_json().encode())
    await stage._assigned({TopicPartition(t, 0) for t in ("conv", "resp")})
    await _hook_done(stage)
    state = table.get(0, key[0])
    assert state is not None
    assert state.history[-1].content == "first"
    tracked = {id(o) for o in gc.get_objects()}
    assert id(state) not in tracked  # frozen: no generation holds it
    assert id(state.history) not in tracked
    assert gc.is_tracked(state)  # still a container the collector knows

    await stage._revoked({TopicPartition(t, 0) for t in ("conv", "resp")})
    await stage._assigned({TopicPartition(t, p) for t in ("conv", "resp") for p in (0, 1)})
    await _hook_done(stage)
    later = table.get(1, key[1])
    assert later is not None
    assert id(later) in {id(o) for o in gc.get_objects()}  # the second restore froze nothing
