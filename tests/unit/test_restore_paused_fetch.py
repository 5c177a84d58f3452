"""A partition paused for its restore, with aiokafka's real fetcher: nothing of it is handled
before the restore is done, and nothing of it is lost.

``BatchConsumer`` pauses newly assigned partitions in the assignment callback and resumes them
once the ``on_assigned`` hook (a table restore) returned. A fetch in flight when a partition is
paused still lands in aiokafka's buffer; ``FetchResult.check_assignment`` then drops it without
moving the partition's position, so the records are fetched again once it is resumed — which
is why the stage does not need to seek. Here the real ``AIOKafkaConsumer.getmany``,
subscription state and ``Fetcher.fetched_records`` run; only the broker is replaced, as in
``test_bad_header.py``: ``Broker.serve`` buffers what a fetch of each partition that is not
paused would return from its position (aiokafka's fetch routine skips paused partitions).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, FetchResult, PartitionRecords
from aiokafka.record.memory_records import MemoryRecords
from support.fetcher import install_fetcher, record_batch, remove_fetcher

from streams.settings import Settings
from streams.transport import BatchConsumer, track_acknowledgement

TP = TopicPartition("in", 0)


def _batch(base_offset: int, *values: bytes) -> bytes:
    """A record batch of ``values`` at ``base_offset`` and on."""
    data = record_batch(values)
    data[0:8] = base_offset.to_bytes(8, "big")  # the base offset is not covered by the CRC
    return bytes(data)


class Broker:
    """One partition's record batches, served into the consumer's real fetcher buffer."""

    def __init__(self, consumer: Any, batches: list[bytes]) -> None:
        self.consumer = consumer
        self.data = b"".join(batches)
        subscription = consumer._subscription
        subscription.assign_from_user({TP})
        subscription.seek(TP, 0)  # the committed offset
        install_fetcher(consumer, self.serve, max_wait_ms=20)

    def serve(self) -> None:
        if not self.state().paused:
            self.buffer()

    def state(self) -> Any:
        return self.consumer._subscription.subscription.assignment.state_value(TP)

    def buffer(self) -> None:
        """Put into the fetcher's buffer what a fetch from the position returns (when nothing
        is buffered yet and the position is before the end)."""
        fetcher = self.consumer._fetcher
        position = self.state().position
        if TP in fetcher._records or position >= 3:
            return
        records = PartitionRecords(
            TP, MemoryRecords(self.data), [], position, None, None, True, READ_UNCOMMITTED
        )
        assignment = self.consumer._subscription.subscription.assignment
        fetcher._records[TP] = FetchResult(
            TP, assignment=assignment, partition_records=records, backoff=0
        )

    def close(self) -> None:
        """Take the stand-ins out again, so the consumer closes as one never started."""
        remove_fetcher(self.consumer)


async def test_a_partition_paused_for_its_restore_is_handled_after_it_from_its_position() -> None:
    handled: list[int] = []
    committed: list[int] = []
    events: list[str] = []
    release = asyncio.Event()

    async def handle(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        handled.extend(r.offset for r in records)
        events.append("handled")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        track_acknowledgement(done)

    async def restore(tps: set[TopicPartition]) -> None:
        await release.wait()
        events.append("restored")

    stage = BatchConsumer(Settings(), "paused", ["in"], handle, on_assigned=restore)

    async def commit(offsets: dict[TopicPartition, Any]) -> None:
        committed.append(offsets[TP].offset)

    stage.consumer.commit = commit  # type: ignore[method-assign]
    broker = Broker(stage.consumer, [_batch(0, b"r0", b"r1"), _batch(2, b"r2")])

    await asyncio.wait_for(stage._assigned({TP}), timeout=0.2)  # returns while it restores
    assert broker.state().paused
    broker.buffer()  # a fetch in flight when the partition was paused lands now
    run = asyncio.ensure_future(stage.run())
    await asyncio.sleep(0.2)

    assert events == []
    assert TP not in stage.consumer._fetcher._records  # aiokafka dropped what it buffered...
    assert broker.state().position == 0  # ...and kept the position: nothing lost
    release.set()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if len(handled) >= 3:
            break
        await asyncio.sleep(0.01)
    stage.stop_soon()
    await asyncio.wait_for(run, 2)
    broker.close()
    await stage.close()

    assert handled == [0, 1, 2]
    assert events[0] == "restored"
    assert committed[-1] == 3
