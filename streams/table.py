"""A partitioned key → value table kept in memory and backed by a compacted changelog topic.

The table is partitioned like its source topics: partition ``p`` of the table holds the keys of
partition ``p`` of the inputs, and its changes go to partition ``p`` of the changelog, so the
worker that owns an input partition owns (and restores) the matching state — the Kafka Streams
/ Faust table model.

Restoring does not trust ListOffsets: the table writes a marker record to each changelog
partition it restores and reads from the beginning up to that marker's offset. That works on
any broker, including one whose ListOffsets answers the base offset of the newest batch
(Tansu, see ENVIRONMENT.md), where reading "up to the end offset" would stop early.

The stage's ``BatchConsumer`` runs the restore in a task of its own, not in aiokafka's
assignment callback (where the group's heartbeat is stopped, so a restore longer than the
session timeout would get the member evicted): the partitions' input stays paused until the
restore returned, so no batch is handled against a partition not restored yet. A revoke
cancels a restore still running; ``restore`` applies what it read only at its very end, with no
await in between, so a cancelled restore leaves the table as it was (no partition half
restored, no position moved), and the next assignment restores or catches up from there.
What a cancelled (or failed) restore had read of a partition it was rebuilding is kept aside,
though, for ``RESUME_WITHIN_S``: the next restore of that partition goes on from the offset
where the last one stopped instead of from the beginning, so a worker whose restores a rolling
deploy keeps cutting short still gets through a long changelog (Tansu never compacts one).

A partition that stays with this worker across a rebalance is not restored from scratch but
caught up: read from just after the last changelog record this table wrote or read, up to a
new marker. Usually that is the marker alone; but a worker that missed a round of the group
(paused longer than the session timeout, say) gets partitions back that another worker owned
and changed meanwhile, and those changes must not be lost under the stale copy kept here.

A deleted key is written to the changelog as a tombstone (the key with a null value); restoring
or catching up removes the key when it reads one, and compaction eventually drops the key's
earlier records and, after ``delete.retention.ms``, the tombstone itself.

A changelog record larger than the changelog topic takes (``Producer.limit``: the producer's
``max_request_size``, or the topic's lower ``max.message.bytes``) cannot be written: its send
fails (``MessageSizeTooLargeError``, or a refusal by the broker after the batch's
acknowledgements) and the worker exits without committing (the table in memory would
otherwise be ahead of its changelog). A writer checks the encoded size against
``max_value_bytes`` before it changes anything, and may hand the bytes it measured to
``put_many`` (``Encoded``) so that nothing is encoded twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.settings import Settings
from streams.transport import Producer, Record, after_acknowledged, step_over, unreadable

__all__ = ["CHANGELOG_HEADROOM_BYTES", "MARKER_KEY", "RESUME_WITHIN_S", "ChangelogTable", "Encoded"]

log = logging.getLogger(__name__)

MARKER_KEY = b"\x00switchboard.restore-marker"
"""Key of the marker records written before each restore (ignored when reading)."""

CHANGELOG_HEADROOM_BYTES = 1024
"""Bytes a changelog record keeps free below the producer's ``max_request_size``, besides its
key: the record and batch overhead aiokafka counts (under 100 bytes without headers)."""

RESUME_WITHIN_S = 600.0
"""How long what a cut-short restore read of a partition is kept to resume from (s): long
enough for the rounds of a rolling deploy, far below the changelog's ``delete.retention.ms``
(Kafka's default: one day). Past that, compaction may have removed a tombstone that a resumed
read, starting after the keys it deletes, would have needed to see."""

V = TypeVar("V")


@dataclass(slots=True)
class _Partial:
    """What a cut-short restore had read of one partition: the last bytes per key (None:
    deleted) of the records before ``next_offset``."""

    next_offset: int
    latest: dict[bytes, bytes | None]
    read: int
    """Change records read (markers not counted)."""
    read_since: float
    """``time.monotonic()`` when the first of the restores that read it started."""


@dataclass(frozen=True, slots=True)
class Encoded(Generic[V]):
    """A value for ``ChangelogTable.put_many`` with its changelog bytes already encoded
    (``data`` must be what the table's ``encode`` returns for ``value``)."""

    value: V
    data: bytes


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
        self._position: dict[int, int] = {}
        """Per held partition: the changelog offset from which records are not applied here
        (one past the last record this table wrote or read)."""
        self._partial: dict[int, _Partial] = {}
        """Per partition not held: what a cut-short restore read of it (``RESUME_WITHIN_S``)."""

    def partitions(self) -> set[int]:
        """Partitions this worker holds (restored and not revoked)."""
        return set(self._data)

    def get(self, partition: int, key: bytes) -> V | None:
        """The value of ``key`` in ``partition`` (None when absent or not held here)."""
        return self._data.get(partition, {}).get(key)

    def max_value_bytes(self, key: bytes) -> int:
        """The largest encoded value (bytes) a changelog record of ``key`` can carry: the
        largest record the changelog topic takes (``Producer.limit``: the producer's
        ``max_request_size``, or the topic's lower ``max.message.bytes``) less the key and
        ``CHANGELOG_HEADROOM_BYTES``.

        ``put_many`` does not check it: a larger value makes the worker exit once the batch's
        acknowledgements are in (see the module docstring), so a writer whose values can grow
        checks them first.
        """
        return self.producer.limit(self.changelog) - len(key) - CHANGELOG_HEADROOM_BYTES

    def put_many(self, changes: Sequence[tuple[int, bytes, V | Encoded[V] | None]]) -> None:
        """Store ``(partition, key, value)`` changes made by the batch being handled; a value
        of None deletes the key (its changelog record is a tombstone: same key, null value),
        and an ``Encoded`` value is stored with the changelog bytes it carries (not encoded
        again).

        The changes are visible at once (to the next records and batches); their changelog
        records are sent once every record the batch produced was acknowledged, in batch
        order (``streams.transport.after_acknowledged``): a restored state never accounts
        for an output that was lost, and a deletion is never restored before it is durable.

        Raises:
            KeyError: a partition is not held by this worker.
            RuntimeError: called outside a batch being handled by a ``BatchConsumer``.
        """
        # Everything is encoded before anything is stored: an encode error changes nothing.
        encoded: list[tuple[int, bytes, V | None, bytes | None]] = [
            (p, key, value.value, value.data)
            if isinstance(value, Encoded)
            else (p, key, value, None if value is None else self.encode(value))
            for p, key, value in changes
        ]
        for partition, key, stored, _ in encoded:
            entries = self._data[partition]
            if stored is None:
                entries.pop(key, None)
            else:
                entries[key] = stored

        async def write() -> None:
            for partition, key, _, data in encoded:
                ack = await self.producer.send(self.changelog, data, key=key, partition=partition)
                ack.add_done_callback(functools.partial(self._written, partition))

        after_acknowledged(write)

    def _written(self, partition: int, ack: asyncio.Future[Any]) -> None:
        """Move the partition's position past one of its own acknowledged changelog records —
        only when that record is the next one: a gap means someone else wrote in between
        (a worker that owned the partition while this one was away), and the next catch-up
        must read from there rather than skip it."""
        if ack.cancelled() or ack.exception() is not None or partition not in self._data:
            return
        offset = int(ack.result().offset)
        if self._position.get(partition) == offset:
            self._position[partition] = offset + 1

    def items(self) -> Iterator[tuple[int, bytes, V]]:
        """(partition, key, value) of every entry held here."""
        for partition, entries in list(self._data.items()):
            for key, value in list(entries.items()):
                yield partition, key, value

    def drop(self, partitions: set[int]) -> None:
        """Forget ``partitions`` (revoked: another worker restores them), and what cut-short
        restores read longer ago than ``RESUME_WITHIN_S``."""
        for partition in partitions:
            self._data.pop(partition, None)
            self._position.pop(partition, None)
        self._forget_stale()

    async def restore(self, partitions: set[int], *, timeout_s: float = 300.0) -> int:
        """Bring ``partitions`` up to date with the changelog; return the change records
        read (marker records not counted).

        A partition not held here is rebuilt from the beginning of the changelog; one held
        here is caught up from its position (see the module docstring). A marker record is
        produced to each partition first, and reading stops at the marker, so every change
        written before the call is applied, whatever the broker says its end offsets are.
        A tombstone (null value) removes its key.

        Cancelled before it returns (the partitions revoked meanwhile), it changes nothing:
        what was read is applied at the end, without awaiting in between. Only the marker
        records it already wrote stay in the changelog (they are skipped when reading). What
        it read of the partitions it was rebuilding is kept aside, and a restore of one of
        them within ``RESUME_WITHIN_S`` goes on from there (as it does after a failure).

        Raises:
            TimeoutError: the markers were not reached within ``timeout_s`` seconds.
        """
        wanted = sorted(partitions)
        if not wanted:
            return 0
        started = time.perf_counter()
        began = time.monotonic()
        new = [p for p in wanted if p not in self._data or p not in self._position]
        marker = uuid.uuid4().hex.encode()
        futures = [
            await self.producer.send(self.changelog, marker, key=MARKER_KEY, partition=p)
            for p in wanted
        ]
        stops = {p: (await f).offset for p, f in zip(wanted, futures, strict=True)}
        entries_of: dict[int, dict[bytes, V]] = {
            p: {} if p in new else self._data[p] for p in wanted
        }
        # the last bytes per key (None: deleted); decoded once at the end, so a key written
        # many times costs one decode, not one per write: the partitions' batches wait (paused)
        # until the restore is done, and the LLM calls in flight share the event loop with it
        latest_of: dict[int, dict[bytes, bytes | None]] = {p: {} for p in wanted}
        read = {p: 0 for p in wanted}
        next_of = {p: 0 for p in new}  # where the read of a rebuilt partition has got to
        resumed = self._resumable(new)
        for p, partial in resumed.items():
            latest_of[p], read[p], next_of[p] = partial.latest, partial.read, partial.next_offset
        try:
            await self._read(wanted, new, stops, latest_of, read, next_of, timeout_s)
            decoded: list[tuple[int, bytes, V | None]] = []
            for p in wanted:
                for number, (key, value) in enumerate(latest_of[p].items()):
                    if number % 1000 == 999:  # let the LLM calls in flight go on meanwhile
                        await asyncio.sleep(0)
                    decoded.append((p, key, None if value is None else self.decode(value)))
        except BaseException:  # cancelled (revoked), timed out, a broker error, a bad value
            for p in new:
                since = resumed[p].read_since if p in resumed else began
                self._partial[p] = _Partial(next_of[p], latest_of[p], read[p], since)
            raise
        for p, key, state in decoded:  # no await from here on: readers see all or nothing
            if state is None:
                entries_of[p].pop(key, None)
            else:
                entries_of[p][key] = state
        self._data.update(entries_of)
        for p in wanted:
            self._position[p] = stops[p] + 1
        elapsed = time.perf_counter() - started
        if new:
            log.info(
                "restored %d key(s) of %s%s from %d changelog record(s) in %.2f s%s",
                sum(len(entries_of[p]) for p in new),
                self.changelog,
                new,
                sum(read[p] for p in new),
                elapsed,
                "".join(
                    f"; partition {p} went on from offset {partial.next_offset} where a "
                    f"cut-short restore stopped ({partial.read} record(s) read then)"
                    for p, partial in sorted(resumed.items())
                ),
            )
        kept = [p for p in wanted if p not in new]
        if kept:
            caught_up = sum(read[p] for p in kept)
            log.log(
                logging.WARNING if caught_up else logging.DEBUG,
                "caught up %s%s: %d change(s) written by another worker while they were away",
                self.changelog,
                kept,
                caught_up,
            )
        return sum(read.values())

    async def _fetch(
        self, consumer: AIOKafkaConsumer, left: set[int], refetched: dict[TopicPartition, int]
    ) -> dict[TopicPartition, list[Record]]:
        """``getmany`` of the changelog partitions ``left``, stepping over records the client
        cannot read (``streams.transport.step_over``: a batch failing its CRC check is
        fetched once more first). A change record skipped so is lost for good, logged
        (error) and counted (``stage="<changelog>.restore"``): the key keeps its value from
        before (or stays deleted, or comes back if the skip was its tombstone), and its next
        change is made from that value and written, so later restores carry the loss too.
        Failing the restore instead would fail it on every try: all conversations of the
        partition would wait, not one."""
        try:
            fetched: dict[TopicPartition, list[Record]] = await consumer.getmany(
                *[TopicPartition(self.changelog, p) for p in left],
                timeout_ms=200,
                max_records=10_000,
            )
            return fetched
        except Exception as exc:
            found = unreadable(exc)
            if found is None:
                raise
        tp, skip, taken = found
        step_over(consumer, f"{self.changelog}.restore", tp, skip, refetched)
        return taken

    def _resumable(self, new: list[int]) -> dict[int, _Partial]:
        """Take what cut-short restores read of ``new`` partitions, if recent enough; forget
        what they read of any partition longer ago than ``RESUME_WITHIN_S``."""
        self._forget_stale()
        return {p: self._partial.pop(p) for p in new if p in self._partial}

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for p in [
            p for p, part in self._partial.items() if now - part.read_since >= RESUME_WITHIN_S
        ]:
            del self._partial[p]

    async def _read(
        self,
        wanted: list[int],
        new: list[int],
        stops: dict[int, int],
        latest_of: dict[int, dict[bytes, bytes | None]],
        read: dict[int, int],
        next_of: dict[int, int],
        timeout_s: float,
    ) -> None:
        """Read the changelog partitions ``wanted`` up to their ``stops`` (marker offsets)
        into ``latest_of``, from the beginning (``new`` ones, or from ``next_of`` where a
        cut-short restore got to) or from ``_position`` (held ones); keep ``read`` and
        ``next_of`` up to date record by record, so that a cancellation leaves them exact."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.broker_list(),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        try:
            await consumer.start()  # (in the try: a restore cancelled while it starts stops it)
            consumer.assign([TopicPartition(self.changelog, p) for p in wanted])
            scratch = [p for p in new if next_of[p] == 0]
            if scratch:  # (with no argument aiokafka would rewind every assigned partition)
                await consumer.seek_to_beginning(
                    *[TopicPartition(self.changelog, p) for p in scratch]
                )
            for p in wanted:
                if p not in new:
                    consumer.seek(TopicPartition(self.changelog, p), self._position[p])
                elif next_of[p]:
                    consumer.seek(TopicPartition(self.changelog, p), next_of[p])
            left = set(wanted)
            refetched: dict[TopicPartition, int] = {}
            async with asyncio.timeout(timeout_s):
                while left:
                    batch = await self._fetch(consumer, left, refetched)
                    for tp, records in batch.items():
                        p = tp.partition
                        latest = latest_of[p]
                        for record in records:
                            if record.offset >= stops[p]:
                                left.discard(p)
                                break
                            if p in next_of:
                                next_of[p] = record.offset + 1
                            if record.key is None or record.key == MARKER_KEY:
                                continue
                            read[p] += 1
                            latest[record.key] = record.value
        finally:
            # shielded: a restore cancelled while it stops its consumer still stops it
            await asyncio.shield(consumer.stop())
