"""A record the client cannot read (a header key that is not UTF-8) does not stop its stage.

aiokafka 0.14 decodes header keys as strict UTF-8 while ``getmany`` hands records out, so the
``UnicodeDecodeError`` of one record left ``getmany`` with nothing returned, ``run()`` died, and
the restarted worker failed again at the same offset. Here the real ``AIOKafkaConsumer.getmany``
and aiokafka's fetcher (``Fetcher.fetched_records``, ``FetchResult``, ``PartitionRecords``)
read real record batches with a valid CRC; only the broker is replaced: ``Log.serve`` puts into
the fetcher's buffer what a fetch from each partition's position would return, as its
background fetch task does. A record batch failing its CRC check is fetched once more before
it is skipped, by a stage and by a table restore (which used to fail on it, every time).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, FetchResult, PartitionRecords
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from prometheus_client import REGISTRY
from support.fetcher import install_fetcher, record_batch, remove_fetcher

from streams.settings import Settings
from streams.table import ChangelogTable
from streams.transport import BatchConsumer, track_acknowledgement

STAGE = "badheader"
TP0, TP1, TP2 = (TopicPartition("in", p) for p in range(3))
_MARK = b"QQ"  # the header key replaced by bytes that are not UTF-8


def _batch(
    base_offset: int, *values: bytes, bad: int | None = None, corrupt: bool = False
) -> bytes:
    """A record batch of ``values`` at ``base_offset`` and on; the record at offset ``bad``
    has a header key that is not UTF-8, under a valid CRC. ``corrupt``: a byte of the last
    value changed after the CRC was computed."""

    def headers(delta: int) -> list[tuple[str, bytes]]:
        return [(_MARK.decode(), b"x")] if base_offset + delta == bad else []

    data = bytearray(bytes(record_batch(values, headers)).replace(_MARK, b"\xff\xfe"))
    struct.pack_into(">q", data, 0, base_offset)  # not covered by the CRC
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    if corrupt:
        data[data.rindex(values[-1])] ^= 0x01
    return bytes(data)


class Log:
    """The partitions' record batches, served into aiokafka's fetcher buffer."""

    def __init__(self, consumer: Any, batches: dict[TopicPartition, list[tuple[int, bytes]]]):
        self.consumer = consumer
        self.batches = batches  # (offset after the batch, batch bytes), in offset order
        self.served = 0
        """Fetches served (partitions that got data), across calls."""
        subscription = consumer._subscription
        subscription.assign_from_user(set(batches))
        for tp in batches:
            subscription.seek(tp, 0)
        install_fetcher(consumer, lambda: self.serve())

    def serve(self) -> None:
        """Fetch every partition that has nothing buffered, from its position: the batches
        that end after it (a broker returns whole batches)."""
        fetcher = self.consumer._fetcher
        assignment = self.consumer._subscription.subscription.assignment
        for tp, batches in self.batches.items():
            position = assignment.state_value(tp).position
            data = b"".join(batch for end, batch in batches if end > position)
            if tp in fetcher._records or not data:
                continue
            records = PartitionRecords(
                tp, MemoryRecords(data), [], position, None, None, True, READ_UNCOMMITTED
            )
            fetcher._records[tp] = FetchResult(
                tp, assignment=assignment, partition_records=records, backoff=0
            )
            self.served += 1

    def close(self) -> None:
        """Take the stand-ins out again, so the consumer closes as one never started."""
        remove_fetcher(self.consumer)


class Stage:
    """A BatchConsumer on ``Log``: records what it handles, reports as unreadable, commits."""

    def __init__(self, batches: dict[TopicPartition, list[tuple[int, bytes]]]) -> None:
        self.handled: list[tuple[int, int, bytes]] = []
        self.unreadable: list[tuple[str, int, int, str]] = []
        self.committed: dict[TopicPartition, int] = {}
        self.acks: list[asyncio.Future[Any]] = []
        self.changed = asyncio.Event()
        self.consumer = BatchConsumer(Settings(), STAGE, ["in"], self.handle)
        self.consumer.assigned = set(batches)
        self.log = Log(self.consumer.consumer, batches)

        async def commit(offsets: dict[TopicPartition, Any]) -> None:
            self.committed.update({tp: meta.offset for tp, meta in offsets.items()})
            self.changed.set()

        self.consumer.consumer.commit = commit  # type: ignore[method-assign]

    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        self.handled.extend((r.partition, r.offset, r.value or b"") for r in records)
        self.changed.set()

    async def report(self, topic: str, partition: int, offset: int, reason: str) -> None:
        """A placeholder dead letter whose acknowledgement the test gives."""
        self.unreadable.append((topic, partition, offset, reason))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        track_acknowledgement(ack)
        self.changed.set()

    async def until(self, done: Callable[[], bool], run: asyncio.Future[None]) -> None:
        """Wait (at most 5 s) until ``done()``; raise what ``run`` (the consumer) raised if it
        ended first."""

        async def watch() -> None:
            while not done():
                self.changed.clear()
                await self.changed.wait()

        watching = asyncio.ensure_future(watch())
        await asyncio.wait({watching, run}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if run.done():
            run.result()
        assert done(), "timed out"

    async def stop(self, run: asyncio.Future[None]) -> None:
        self.consumer.stop_soon()
        await asyncio.wait_for(run, 5)
        self.log.close()
        await self.consumer.close()


def _unreadable_count() -> float:
    labels = {"stage": STAGE, "error_type": "UnreadableRecord"}
    return REGISTRY.get_sample_value("switchboard_stage_errors_total", labels) or 0.0


async def test_unreadable_records_are_skipped_reported_and_committed_past(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stage = Stage(
        {
            # Drained first by the fetch that fails on TP0: its records must not be lost.
            TP1: [(2, _batch(0, b"p1-0", b"p1-1"))],
            # Offset 1 is unreadable; 2, in the same batch, cannot be parsed past it.
            TP0: [(3, _batch(0, b"p0-0", b"p0-1", b"p0-2", bad=1)), (4, _batch(3, b"p0-3"))],
            TP2: [(1, _batch(0, b"p2-0", bad=0)), (2, _batch(1, b"p2-1"))],
        }
    )
    stage.consumer.on_unreadable = stage.report
    before = _unreadable_count()
    caplog.set_level(logging.ERROR, logger="streams.transport")

    run = asyncio.ensure_future(stage.consumer.run())
    await stage.until(lambda: len(stage.handled) == 5 and len(stage.unreadable) == 3, run)
    for ack in stage.acks:
        ack.set_result(None)
    await stage.until(lambda: stage.committed == {TP0: 4, TP1: 2, TP2: 2}, run)
    # At most the fetch in progress is counted: the failed ones did not leave the consumer
    # looking busy for good (aiokafka's max_poll_interval_ms check).
    assert stage.consumer.consumer._subscription._fetch_count <= 1
    await stage.stop(run)

    assert run.exception() is None
    assert sorted(stage.handled) == [
        (0, 0, b"p0-0"),
        (0, 3, b"p0-3"),
        (1, 0, b"p1-0"),
        (1, 1, b"p1-1"),
        (2, 1, b"p2-1"),
    ]
    assert [(t, p, o) for t, p, o, _ in stage.unreadable] == [
        ("in", 0, 1),
        ("in", 0, 2),
        ("in", 2, 0),
    ]
    assert all(reason.startswith("UnicodeDecodeError: ") for *_, reason in stage.unreadable)
    assert _unreadable_count() - before == 3
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("in[0] offsets 1 to 2 cannot be read" in m for m in logged)
    assert any("in[2] offsets 0 to 0 cannot be read" in m for m in logged)


async def test_a_skipped_offset_is_committed_only_after_its_report_was_acknowledged() -> None:
    stage = Stage({TP0: [(2, _batch(0, b"p0-0", b"p0-1", bad=1))]})
    stage.consumer.on_unreadable = stage.report

    run = asyncio.ensure_future(stage.consumer.run())
    await stage.until(lambda: len(stage.unreadable) == 1, run)
    await asyncio.sleep(0.5)  # two periodic commits (every 0.2 s)
    assert stage.committed == {}  # offset 0's batch also covers offset 1, not yet reported

    stage.acks[0].set_result(None)
    await stage.until(lambda: stage.committed.get(TP0) == 2, run)
    await stage.stop(run)

    assert run.exception() is None
    assert [(p, o) for p, o, _ in stage.handled] == [(0, 0)]
    assert [(p, o) for _, p, o, _ in stage.unreadable] == [(0, 1)]


async def test_a_batch_corrupted_on_the_way_is_fetched_again_and_handled() -> None:
    stage = Stage({TP0: [(2, _batch(0, b"p0-0", b"p0-1", corrupt=True))]})
    stage.consumer.on_unreadable = stage.report
    unreadable_before = _unreadable_count()
    served = stage.log.serve

    def heal() -> None:  # the second fetch reads the batch as the broker stored it
        served()
        stage.log.batches[TP0] = [(2, _batch(0, b"p0-0", b"p0-1"))]

    stage.log.serve = heal  # type: ignore[method-assign]
    run = asyncio.ensure_future(stage.consumer.run())
    await stage.until(lambda: stage.committed == {TP0: 2}, run)
    await stage.stop(run)

    assert stage.handled == [(0, 0, b"p0-0"), (0, 1, b"p0-1")]
    assert stage.unreadable == []
    assert stage.consumer._refetched == {}  # read past it: a later failure there is new
    assert _unreadable_count() == unreadable_before
    assert stage.log.served == 2


async def test_a_batch_that_fails_its_crc_check_is_skipped_whole() -> None:
    stage = Stage({TP0: [(2, _batch(0, b"p0-0", b"p0-1", corrupt=True)), (3, _batch(2, b"p0-2"))]})
    stage.consumer.on_unreadable = stage.report

    run = asyncio.ensure_future(stage.consumer.run())
    await stage.until(lambda: len(stage.handled) == 1 and len(stage.unreadable) == 2, run)
    for ack in stage.acks:
        ack.set_result(None)
    await stage.until(lambda: stage.committed == {TP0: 3}, run)
    await stage.stop(run)

    assert stage.handled == [(0, 2, b"p0-2")]
    assert [(p, o) for _, p, o, _ in stage.unreadable] == [(0, 0), (0, 1)]
    assert all(r.startswith("CorruptRecordException: ") for *_, r in stage.unreadable)
    assert stage.log.served == 3  # the corrupt batch twice (fetched again once), then p0-2


class ChangelogLog:
    """A changelog partition for a ``ChangelogTable`` restore: its restore consumer is a real
    ``AIOKafkaConsumer`` (never started) reading ``Log``; the producer appends the marker."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, batches: list[tuple[int, bytes]]):
        self.batches = {TopicPartition("cl", 0): batches}
        self.logs: list[Log] = []
        monkeypatch.setattr("streams.table.AIOKafkaConsumer", self.consumer)

    def consumer(self, **_: Any) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer()
        logs = self.logs

        async def start() -> None:
            return None

        def assign(tps: list[TopicPartition]) -> None:
            logs.append(Log(consumer, {tp: self.batches[tp] for tp in tps}))

        async def seek_to_beginning(*tps: TopicPartition) -> None:
            for tp in tps:
                consumer._subscription.seek(tp, 0)

        async def stop() -> None:
            logs[-1].close()
            await AIOKafkaConsumer.stop(consumer)

        consumer.start = start  # type: ignore[method-assign]
        consumer.assign = assign  # type: ignore[method-assign]
        consumer.seek_to_beginning = seek_to_beginning  # type: ignore[method-assign]
        consumer.stop = stop  # type: ignore[method-assign]
        return consumer

    def table(self) -> ChangelogTable[str]:
        """A table of str values on this changelog, its producer this object."""
        producer: Any = self
        return ChangelogTable(Settings(), producer, "cl", encode=str.encode, decode=bytes.decode)

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None = None, **_: Any
    ) -> asyncio.Future[Any]:
        """The marker, appended after the last batch."""
        batches = self.batches[TopicPartition(topic, 0)]
        end = batches[-1][0] if batches else 0
        batches.append((end + 1, _batch(end, value or b"")))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(SimpleNamespace(offset=end))
        return ack


def _restore_unreadable_count() -> float:
    labels = {"stage": "cl.restore", "error_type": "UnreadableRecord"}
    return REGISTRY.get_sample_value("switchboard_stage_errors_total", labels) or 0.0


async def test_a_restore_steps_over_a_changelog_batch_that_stays_corrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changelog = ChangelogLog(monkeypatch, [(2, _batch(0, b"v0", b"v1", corrupt=True))])
    table = changelog.table()
    before = _restore_unreadable_count()

    assert await asyncio.wait_for(table.restore({0}), 5) == 0

    assert table.partitions() == {0}
    assert table.get(0, b"k") is None  # both changes lost to the restore, counted
    assert _restore_unreadable_count() == before + 2
    assert changelog.logs[0].served == 3  # the corrupt batch twice, then the marker


async def test_a_restore_fetches_a_corrupt_changelog_batch_again_before_giving_it_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changelog = ChangelogLog(monkeypatch, [(2, _batch(0, b"v0", b"v1", corrupt=True))])
    table = changelog.table()
    original = Log.serve

    def heal(log: Log) -> None:  # the second fetch reads the batch as the broker stored it
        original(log)
        log.batches[TopicPartition("cl", 0)][0] = (2, _batch(0, b"v0", b"v1"))

    monkeypatch.setattr(Log, "serve", heal)
    before = _restore_unreadable_count()

    assert await asyncio.wait_for(table.restore({0}), 5) == 2

    assert table.get(0, b"k") == "v1"
    assert _restore_unreadable_count() == before
