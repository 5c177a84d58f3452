"""A partitioned key → value table kept in memory and backed by a compacted changelog topic.

The table is partitioned like its source topics: partition ``p`` of the table holds the keys of
partition ``p`` of the inputs, and its changes go to partition ``p`` of the changelog, so the
worker that owns an input partition owns (and restores) the matching state — the Kafka Streams
/ Faust table model.

Restoring does not trust ListOffsets: the table writes a marker record to each changelog
partition it restores and reads from the beginning up to that marker's offset. That works on
any broker, including one whose ListOffsets answers the base offset of the newest batch
(Tansu, see ENVIRONMENT.md), where reading "up to the end offset" would stop early.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.settings import Settings
from streams.transport import Producer, after_acknowledged

__all__ = ["MARKER_KEY", "ChangelogTable"]

log = logging.getLogger(__name__)

MARKER_KEY = b"\x00switchboard.restore-marker"
"""Key of the marker records written before each restore (ignored when reading)."""

V = TypeVar("V")


class ChangelogTable(Generic[V]):
    """Values of type ``V`` by key (bytes), per partition, with a changelog topic.

    Args:
        settings: brokers and fetch wait for the restore consumer.
        producer: the worker's producer; changelog records are sent with it, and are
            acknowledged before the offsets of the batch that wrote them are committed.
        changelog: the changelog topic (compacted; same partition count as the inputs).
        encode / decode: value ↔ changelog bytes.
    """

    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        changelog: str,
        *,
        encode: Callable[[V], bytes],
        decode: Callable[[bytes], V],
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.changelog = changelog
        self.encode = encode
        self.decode = decode
        self._data: dict[int, dict[bytes, V]] = {}

    def partitions(self) -> set[int]:
        """Partitions this worker holds (restored and not revoked)."""
        return set(self._data)

    def get(self, partition: int, key: bytes) -> V | None:
        """The value of ``key`` in ``partition`` (None when absent or not held here)."""
        return self._data.get(partition, {}).get(key)

    def put_many(self, changes: list[tuple[int, bytes, V]]) -> None:
        """Store ``(partition, key, value)`` changes made by the batch being handled.

        The values are visible at once (to the next records and batches); their changelog
        records are sent once every record the batch produced was acknowledged, in batch
        order (``streams.transport.after_acknowledged``): a restored state never accounts
        for an output that was lost.

        Raises:
            KeyError: a partition is not held by this worker.
            RuntimeError: called outside a batch being handled by a ``BatchConsumer``.
        """
        encoded = [(p, key, self.encode(value)) for p, key, value in changes]
        for partition, key, value in changes:
            self._data[partition][key] = value

        async def write() -> None:
            for partition, key, data in encoded:
                await self.producer.send(self.changelog, data, key=key, partition=partition)

        after_acknowledged(write)

    def items(self) -> Iterator[tuple[int, bytes, V]]:
        """(partition, key, value) of every entry held here."""
        for partition, entries in list(self._data.items()):
            for key, value in list(entries.items()):
                yield partition, key, value

    def drop(self, partitions: set[int]) -> None:
        """Forget ``partitions`` (revoked: another worker restores them)."""
        for partition in partitions:
            self._data.pop(partition, None)

    async def restore(self, partitions: set[int], *, timeout_s: float = 300.0) -> int:
        """Rebuild ``partitions`` from the changelog; return the number of records read.

        A marker record is produced to each partition first; reading stops at the marker, so
        every change written before the restore began is applied, whatever the broker says
        its end offsets are.

        Raises:
            TimeoutError: the markers were not reached within ``timeout_s`` seconds.
        """
        wanted = sorted(p for p in partitions if p not in self._data)
        if not wanted:
            return 0
        started = time.perf_counter()
        marker = uuid.uuid4().hex.encode()
        futures = [
            await self.producer.send(self.changelog, marker, key=MARKER_KEY, partition=p)
            for p in wanted
        ]
        stops = {p: (await f).offset for p, f in zip(wanted, futures, strict=True)}
        fresh: dict[int, dict[bytes, V]] = {p: {} for p in wanted}
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.broker_list(),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        read = 0
        try:
            tps = [TopicPartition(self.changelog, p) for p in wanted]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            left = set(wanted)
            async with asyncio.timeout(timeout_s):
                while left:
                    batch = await consumer.getmany(
                        *[TopicPartition(self.changelog, p) for p in left],
                        timeout_ms=200,
                        max_records=10_000,
                    )
                    for tp, records in batch.items():
                        entries = fresh[tp.partition]
                        for record in records:
                            if record.offset >= stops[tp.partition]:
                                left.discard(tp.partition)
                                break
                            read += 1
                            if record.key is None or record.key == MARKER_KEY:
                                continue
                            if record.value is None:
                                entries.pop(record.key, None)
                            else:
                                entries[record.key] = self.decode(record.value)
        finally:
            await consumer.stop()
        self._data.update(fresh)
        log.info(
            "restored %d key(s) of %s%s from %d changelog record(s) in %.2f s",
            sum(len(e) for e in fresh.values()),
            self.changelog,
            wanted,
            read,
            time.perf_counter() - started,
        )
        return read
