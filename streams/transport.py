"""The worker's Kafka transport: one shared producer, and a batch consumer per stage.

Each stage is a consumer group of its own (``<app_id>.<stage>``) reading its input topics in
batches (``getmany``): the stage's handler processes a whole batch, every record it produced is
acknowledged by the broker, and only then are the batch's offsets committed — at-least-once,
with idempotent effects downstream (ARCHITECTURE.md principles 4 and 5). There is no per-event
machinery between the client and the handler; that is where a Faust stream spends most of its
CPU per record (measured in BENCHMARKS.md).

Acknowledgements are collected per batch through a context variable: ``Producer.send`` adds
the record's delivery future to the batch being handled, so a handler cannot forget one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.consumer.fetcher import Fetcher, FetchResult, PartitionRecords
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata

from connectors.errors import ConnectorError
from processors.backoff import backoff_delay
from schemas.errors import SchemaRegistryError
from streams.assignor import CoPartitionedAssignor, default_worker_id
from streams.metrics import STAGE_ERRORS, child
from streams.settings import Settings

__all__ = [
    "BATCH_MAX",
    "BATCH_WITHIN_MS",
    "DEFAULT_FETCH_MAX_WAIT_MS",
    "BatchConsumer",
    "BatchContext",
    "Producer",
    "Record",
    "UnreadableHook",
    "after_acknowledged",
    "cooperate",
    "guard_batch",
    "handling",
    "is_transient",
    "key_partition",
    "record_bytes",
    "step_over",
    "track_acknowledgement",
    "unreadable",
]

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
"""A consumed record: ``topic``, ``partition``, ``offset``, ``key``, ``value`` (bytes),
``headers`` (sequence of ``(str, bytes)``), ``timestamp`` (ms)."""

BATCH_MAX = 500
"""Most records a stage handles per batch: one Redis round trip, one wait for acks, one commit."""
BATCH_WITHIN_MS = 10
"""How long a stage lets more records arrive after the first of a batch (ms)."""
DEFAULT_FETCH_MAX_WAIT_MS = 100
"""Fetch wait when the settings give none (ms): Tansu answers a multi-partition fetch only
when the wait expires, so a long wait adds up at every hop (ENVIRONMENT.md)."""


class BatchContext:
    """What handling one batch left to finish: delivery futures of the records it produced,
    and actions to run once all of them were acknowledged (``after_acknowledged``)."""

    def __init__(self) -> None:
        self.acks: list[asyncio.Future[Any]] = []
        self.after: list[Callable[[], Awaitable[None]]] = []


_batch: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar(
    "switchboard_batch", default=None
)


@contextlib.contextmanager
def handling(ctx: BatchContext) -> Iterator[BatchContext]:
    """Make ``ctx`` the batch that records produced inside the block belong to (what a
    ``BatchConsumer`` does around its handler)."""
    token = _batch.set(ctx)
    try:
        yield ctx
    finally:
        _batch.reset(token)


def track_acknowledgement(future: asyncio.Future[Any]) -> None:
    """Count ``future`` (a record's delivery report) among the current batch's
    acknowledgements, awaited before its offsets are committed; nothing outside a batch.

    ``Producer.send`` calls it for every record; another producer's sends can use it too.
    """
    ctx = _batch.get()
    if ctx is not None:
        ctx.acks.append(future)


def after_acknowledged(action: Callable[[], Awaitable[None]]) -> None:
    """Run ``action`` once every record the current batch produced so far was acknowledged,
    and after the actions of earlier batches of the same stage; records ``action`` produces
    are acknowledged before the batch's offsets are committed.

    This is how a table writes its changelog: only after the outputs that the new state
    accounts for are durable, and in batch order.

    Raises:
        RuntimeError: called outside a batch being handled by a ``BatchConsumer``.
    """
    ctx = _batch.get()
    if ctx is None:
        raise RuntimeError("after_acknowledged() outside a batch")
    ctx.after.append(action)


@functools.lru_cache(maxsize=65536)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


def key_partition(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """The Java client's default partitioner: ``murmur2(key) & 0x7fffffff`` modulo the
    partition count (``org.apache.kafka.common.utils.Utils.murmur2``), a random available
    partition for a null key.

    aiokafka's ``DefaultPartitioner`` computes the same in pure Python on every send; the
    stages send several records per conversation key, so the hash of recent keys is
    remembered.
    """
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[_key_hash(key) % len(all_partitions)]


def record_bytes(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None
) -> int:
    """aiokafka's upper bound of the size (bytes) of a record alone in its batch, batch header
    included: what ``AIOKafkaProducer.send`` checks against ``max_request_size``, and what a
    topic's ``max.message.bytes`` bounds."""
    estimate: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key, value, list(headers or ())
    )
    return estimate


MAX_BATCH_BYTES = 1024 * 1024
"""Largest record batch (bytes) the producer builds, unless a topic takes less."""

MAX_REQUEST_SIZE = 8 * 1024 * 1024
"""Largest produce request (bytes), hence largest record, the producer sends; topics are created
with this ``max.message.bytes`` (``streams.topics``)."""


class Producer:
    """The worker's one aiokafka producer (acks=all, no idempotence: Tansu rejects
    InitProducerId v0, and duplicates are dropped by id downstream).

    Args:
        settings: brokers; ``single_record_batches``.
        record_limits: topic → ``max.message.bytes`` (bytes), as the broker reported it
            (``streams.topics.record_limits``). A topic that takes less than
            ``MAX_REQUEST_SIZE`` gets records only up to its limit (``send`` refuses larger
            ones before the broker would), and every batch is kept within the smallest such
            limit, since ``max.message.bytes`` bounds a whole record batch.
    """

    def __init__(
        self, settings: Settings, *, record_limits: Mapping[str, int] | None = None
    ) -> None:
        self.record_limits: dict[str, int] = {
            topic: limit
            for topic, limit in (record_limits or {}).items()
            if limit < MAX_REQUEST_SIZE
        }
        """Topics taking records only up to a size below ``max_request_size`` (bytes)."""
        options: dict[str, Any] = {
            "bootstrap_servers": settings.broker_list(),
            "acks": "all",
            "linger_ms": 10,
            "max_batch_size": min([MAX_BATCH_BYTES, *self.record_limits.values()]),
            "max_request_size": MAX_REQUEST_SIZE,
            "request_timeout_ms": 30_000,
            "partitioner": key_partition,
        }
        if settings.single_record_batches:
            options["max_batch_size"] = 1  # one record per batch (ENVIRONMENT.md, ListOffsets)
            options["linger_ms"] = 0
        self._producer = AIOKafkaProducer(**options)
        self.max_request_size: int = MAX_REQUEST_SIZE
        """The producer's ``max_request_size`` (bytes): no record may be larger."""

    def limit(self, topic: str) -> int:
        """The largest record (bytes, as aiokafka estimates a record alone in its batch) that
        ``topic`` takes: its ``max.message.bytes`` when lower than ``max_request_size``."""
        return self.record_limits.get(topic, self.max_request_size)

    async def start(self) -> None:
        """Connect to the brokers.

        Raises:
            KafkaConnectionError: no broker answered.
        """
        await self._producer.start()

    async def stop(self) -> None:
        """Send what is buffered, then close."""
        await self._producer.stop()

    async def flush(self) -> None:
        """Wait until every record handed to ``send`` so far was acknowledged or failed."""
        await self._producer.flush()

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one record; return the future of its delivery report (RecordMetadata).

        The key's murmur2 hash picks the partition when ``partition`` is None (the Java
        client's default partitioner), so records of one key stay together on every topic.
        Waits only when the producer's buffer is full (backpressure). Inside a batch being
        handled by a ``BatchConsumer`` the future is also added to that batch's
        acknowledgements, which are awaited before its offsets are committed.

        Raises:
            MessageSizeTooLargeError: the record is larger than ``limit(topic)`` (bytes).
        """
        if self.record_limits:
            lower = self.record_limits.get(topic)
            if lower is not None:
                size = record_bytes(key, value, headers)
                if size > lower:
                    raise MessageSizeTooLargeError(
                        f"a record of {size} bytes exceeds the max.message.bytes of {topic} "
                        f"({lower} bytes)"
                    )
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value, key=key, partition=partition, headers=list(headers or ())
        )
        track_acknowledgement(future)
        return future


YIELD_EVERY = 32
"""Records a handler processes between two yields to the event loop (``cooperate``)."""


async def cooperate(index: int) -> None:
    """Let other tasks run every ``YIELD_EVERY`` records of a batch.

    A stage's loop over a batch rarely suspends (queuing a record in the producer does not), so
    a 500-record batch would hold the event loop for tens of milliseconds; the LLM calls in
    flight and the other stages would all wait that long.
    """
    if index % YIELD_EVERY == YIELD_EVERY - 1:
        await asyncio.sleep(0)


TRANSIENT_RETRY_MAX_S = 30.0
"""Longest pause between two tries of a batch that failed on a transient error (s)."""


def is_transient(exc: BaseException) -> bool:
    """Errors the same batch may get past by trying again: Redis, the schema registry, the
    broker (a produce that was not acknowledged)."""
    if isinstance(exc, ConnectorError | SchemaRegistryError):
        return exc.retriable
    if isinstance(exc, KafkaTimeoutError):  # a send not taken within request_timeout_ms:
        return True  # a partition without a leader for a while; aiokafka says not retriable
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class BatchAbandoned(Exception):
    """A batch given up because its partitions are being revoked (``guard_batch``)."""


async def guard_batch(
    stage: str,
    body: Callable[[], Awaitable[None]],
    *,
    abandon: asyncio.Event | None = None,
    grace_s: float = 0.0,
) -> None:
    """Run one batch so that its offsets are never committed without its outputs.

    Per-record failures are dead-lettered by the stages themselves; what reaches here failed
    for the whole batch. A transient error (Redis down, schema registry unreachable, a produce
    not acknowledged) is retried with capped exponential backoff — backpressure: the partition
    waits, nothing is dropped. Re-running a batch re-creates outputs with the same ids, which
    the next stages drop. Anything else is a bug: the worker exits at once (status 70)
    without committing, and its restart replays the batch.

    Args:
        stage: Name for logs and metrics.
        body: One try of the batch.
        abandon: Set when the batch's partitions are being revoked. A batch waiting to retry
            is then given up at once; a try still running gets ``grace_s`` more seconds and is
            then cancelled. Either way nothing of it is committed and the partitions' next
            owner replays it, instead of this member holding the rebalance past its timeout
            and then handling, as a zombie, partitions another member already handles. What
            the given-up batch already sent (records queued, LLM calls it started, messages
            delivered) stays sent: the replay repeats it and the next stages drop the
            duplicates by id — except a delivery whose report was not written, which a
            replay sends again (at-least-once).
        grace_s: See ``abandon`` (s).

    Raises:
        BatchAbandoned: ``abandon`` was set (the batch must not be marked finished).
    """
    attempt = 0
    while True:
        try:
            if abandon is None:
                await body()
            else:
                await _unless_abandoned(body, abandon, grace_s)
            return
        except BatchAbandoned:
            raise
        except Exception as exc:
            if not is_transient(exc):
                _exit_without_commit(f"{stage}: unrecoverable error in a batch", exc_info=True)
            delay = backoff_delay(attempt, initial_s=0.5, max_s=TRANSIENT_RETRY_MAX_S)
            child(STAGE_ERRORS, stage, type(exc).__name__).inc()
            log.warning("%s: batch failed (%s); retrying in %.1f s", stage, exc, delay)
            attempt += 1
            if abandon is None:
                await asyncio.sleep(delay)
            elif await _abandoned_within(abandon, delay):
                raise BatchAbandoned(
                    f"{stage}: partitions revoked while the batch was retried"
                ) from exc


async def _abandoned_within(abandon: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s`` seconds, or less if ``abandon`` is set meanwhile; return whether it
    was set."""
    sleeper = asyncio.ensure_future(asyncio.sleep(delay_s))
    waiter = asyncio.ensure_future(abandon.wait())
    try:
        await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waiter.cancel()
    return abandon.is_set()


def _exit_without_commit(reason: str, *, exc_info: bool = False) -> NoReturn:
    """Log ``reason`` as critical and end the process at once with status 70, without
    committing: its restart replays every batch not committed (at-least-once)."""
    log.critical("%s; exiting without commit", reason, exc_info=exc_info)
    logging.shutdown()
    os._exit(70)


CANCELLED_BATCH_WAIT_S = 5.0
"""Longest wait for a given-up batch to end once it was cancelled (s). A batch still running
then ignores its cancellation (a bug: something retries or swallows ``CancelledError``). The
worker exits rather than hold the rebalance past its timeout, or let the batch go on beside
the next batches of the same partitions."""


async def _cancel_or_exit(task: asyncio.Future[Any], what: str) -> None:
    """Cancel ``task`` and wait up to ``CANCELLED_BATCH_WAIT_S`` s for it to end; exit
    without commit (status 70) if it still runs then, as ``what``."""
    task.cancel()
    await asyncio.wait({task}, timeout=CANCELLED_BATCH_WAIT_S)
    if not task.done():
        _exit_without_commit(
            f"{what} still runs {CANCELLED_BATCH_WAIT_S:g} s after it was cancelled"
        )


ASSIGN_HOOK_LIMIT_S = 600.0
"""Longest an ``on_assigned`` hook (a table restore, its transient errors retried) may run
(s); longer, the worker exits rather than hold its partitions paused for ever, while its
heartbeat keeps the group from giving them to another member."""


async def _unless_abandoned(
    body: Callable[[], Awaitable[None]], abandon: asyncio.Event, grace_s: float
) -> None:
    """Await ``body``; once ``abandon`` is set, give it ``grace_s`` s more, then cancel it.

    A cancelled ``body`` still running ``CANCELLED_BATCH_WAIT_S`` s later ends the process
    (status 70, nothing committed).

    Raises:
        BatchAbandoned: ``abandon`` was set before ``body`` finished, or before it started.
    """
    if abandon.is_set():
        raise BatchAbandoned("partitions revoked before the batch was tried")
    task = asyncio.ensure_future(body())
    waiter = asyncio.ensure_future(abandon.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace_s)
        if not task.done():
            await _cancel_or_exit(task, "a given-up batch")
            if not task.cancelled() and task.exception() is not None:
                log.debug("a given-up batch ended with %r", task.exception())
            raise BatchAbandoned(f"partitions revoked; the batch ran {grace_s:g} s longer")
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    task.result()


Handler = Callable[[list[Record]], Awaitable[None]]
"""Processes one batch (records of several partitions, each partition's in offset order)."""
PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]
UnreadableHook = Callable[[str, int, int, str], Awaitable[None]]
"""Awaited with ``(topic, partition, offset, reason)`` for each offset a ``BatchConsumer``
skips because the client cannot read its record, e.g. to dead-letter a placeholder; inside
the batch that skips it, so what it produces is acknowledged before the offset is committed."""


@dataclass(frozen=True)
class _Skip:
    """Offsets ``first`` to ``end`` (exclusive) of one partition that the client cannot read,
    and why (the error's type and message)."""

    first: int
    end: int
    reason: str


_CRC_ERROR = "CorruptRecordException: "
"""How ``_Skip.reason`` starts for a record batch whose CRC does not match its bytes."""


def unreadable(
    exc: BaseException,
) -> tuple[TopicPartition, _Skip, dict[TopicPartition, list[Record]]] | None:
    """Where ``exc``, raised by ``AIOKafkaConsumer.getmany``, came from if unpacking a fetched
    record raised it: the partition, the offsets that cannot be read, and the records the call
    had taken (by partition). None for any other error.

    aiokafka 0.14 parses records (header keys as strict UTF-8) while ``getmany`` hands them
    out; what that raises (``UnicodeDecodeError``; ``CorruptRecordException`` for a bad CRC,
    or from the pure-Python reader for any parse error) leaves ``getmany`` with nothing
    returned. Yet the partitions drained before the failing one already moved past their
    records, and the failing one fails again at the same offset on every fetch. The
    traceback's frames of aiokafka's fetcher hold what was read: ``PartitionRecords.
    _unpack_records`` the partition, the offset it failed at (``next_fetch_offset``) and the
    record batch being parsed (``next_batch``: the rest of it cannot be parsed either, unless
    only converting one parsed record failed); ``FetchResult.getall`` the partition's records
    before that offset (``ret_list``); ``Fetcher.fetched_records`` the records of the
    partitions before it (``drained``). None as well when a frame or value is missing or not
    as expected (another aiokafka version): the caller re-raises.
    """
    owners = {
        "fetched_records": Fetcher,
        "getall": FetchResult,
        "_unpack_records": PartitionRecords,
        "_consumer_record": PartitionRecords,
    }
    found: dict[str, dict[str, Any]] = {}
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = owners.get(frame.f_code.co_name)
        if owner is not None and isinstance(frame.f_locals.get("self"), owner):
            found[frame.f_code.co_name] = frame.f_locals
    unpack, getall, fetched = (
        found.get(n) for n in ("_unpack_records", "getall", "fetched_records")
    )
    if unpack is None or getall is None or fetched is None:
        return None
    tp, first = unpack["self"]._tp, unpack["self"].next_fetch_offset
    before, drained = getall.get("ret_list"), fetched.get("drained")
    if not (
        isinstance(tp, TopicPartition)
        and isinstance(first, int)
        and isinstance(before, list)
        and all(r.offset < first for r in before)
        and isinstance(drained, dict)
        and tp not in drained
    ):
        return None
    end = getattr(unpack.get("next_batch"), "next_offset", None)
    if "_consumer_record" in found or not isinstance(end, int) or end <= first:
        end = first + 1
    taken: dict[TopicPartition, list[Record]] = dict(drained)
    if before:
        taken[tp] = list(before)
    return tp, _Skip(first, end, f"{type(exc).__name__}: {exc}"), taken


def _close_fetch_context(consumer: AIOKafkaConsumer) -> None:
    """End the fetch a ``getmany`` that raised left counted as in progress: aiokafka 0.14's
    ``SubscriptionState.fetch_context`` has no ``finally``, and while a fetch is counted the
    consumer never looks idle, so ``max_poll_interval_ms`` would no longer apply to it."""
    subscription = getattr(consumer, "_subscription", None)
    count = getattr(subscription, "_fetch_count", None)
    if isinstance(count, int) and count > 0:
        subscription._fetch_count = count - 1  # type: ignore[union-attr]
        if count == 1:
            subscription._last_fetch_ended = time.monotonic()  # type: ignore[union-attr]


def step_over(
    consumer: AIOKafkaConsumer,
    stage: str,
    tp: TopicPartition,
    skip: _Skip,
    refetched: dict[TopicPartition, int],
) -> bool:
    """Move ``tp``'s position past the offsets ``skip`` that ``getmany`` could not read
    (``unreadable``); return whether it did (False: revoked meanwhile, or fetched again).

    A record batch failing its CRC check is fetched again once first (it may have been
    corrupted on the way, not on the broker's disk): the position is set back to it and
    False returned, unless ``refetched`` (offset last fetched again, by partition; updated
    here) says it already was. A skip is logged and counted in
    ``switchboard_stage_errors_total{stage,error_type="UnreadableRecord"}``.
    """
    _close_fetch_context(consumer)
    if skip.reason.startswith(_CRC_ERROR) and refetched.get(tp) != skip.first:
        log.warning(
            "%s: %s[%d] record batch at offset %d failed its CRC check (%s); fetching it again",
            stage,
            tp.topic,
            tp.partition,
            skip.first,
            skip.reason,
        )
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile
            consumer.seek(tp, skip.first)  # drops what the fetcher buffered
            refetched[tp] = skip.first
        return False
    refetched.pop(tp, None)
    child(STAGE_ERRORS, stage, "UnreadableRecord").inc(skip.end - skip.first)
    log.error(
        "%s: %s[%d] offsets %d to %d cannot be read (%s); skipped",
        stage,
        tp.topic,
        tp.partition,
        skip.first,
        skip.end - 1,
        skip.reason,
    )
    try:
        consumer.seek(tp, skip.end)
    except IllegalStateError:  # revoked meanwhile: the next owner's
        return False
    return True


def _next_offsets(
    batch: dict[TopicPartition, list[Record]], skips: dict[TopicPartition, list[_Skip]]
) -> dict[TopicPartition, int]:
    """The offset after the last record or skipped offset of each partition of a batch."""
    offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
    for tp, tp_skips in skips.items():
        offsets[tp] = max(offsets.get(tp, 0), *(skip.end for skip in tp_skips))
    return offsets


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no stubs
    def __init__(self, owner: BatchConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner._assigned(set(assigned))


PIPELINE_DEPTH = 8
"""Batches of one stage whose acknowledgements may be outstanding while it handles the next."""
COMMIT_INTERVAL_S = 0.2
"""How often a stage commits the offsets of its finished batches (s); a crash replays at most
this much more than the batches still being acknowledged."""


class BatchConsumer:
    """One stage's consumer group member: batches in, handler, acks, offsets committed.

    A batch is handled as soon as it is fetched; its produced records are acknowledged in the
    background while the next batches are handled (up to ``PIPELINE_DEPTH`` batches
    outstanding). Batches finish in order: a batch's ``after_acknowledged`` actions run after
    its own records and every earlier batch finished, and offsets are committed up to the last
    finished batch every ``COMMIT_INTERVAL_S`` — so a committed offset never covers a record
    whose outputs are not durable (at-least-once), and waiting for the broker does not stall
    the stage.

    Args:
        settings: brokers, session timeout, fetch wait.
        stage: the stage's name; the consumer group is ``<app_id>.<stage>``.
        topics: input topics. With several, one member gets the same partition numbers of
            each (co-partitioned inputs, e.g. a stage with a table); across stages, one
            worker gets the same partition numbers in every group (``streams.assignor``).
        handler: processes a batch; dead-letters bad records itself. A transient error it
            raises retries the batch, anything else stops the worker (``guard_batch``). It
            must leave no state changed when it raises or is cancelled (a batch given up
            when its partitions are revoked).
        on_assigned: awaited with the whole new assignment when partitions are assigned (a
            table restores them), before any batch of theirs is handled; under ``guard_batch``'s
            rules (a transient error retried, anything else exits the worker). It runs in a
            task of its own, not in aiokafka's assignment callback, which must return quickly:
            the group's heartbeat stays stopped until it does, and a hook longer than the
            session timeout would get this member evicted. The newly assigned partitions are
            paused meanwhile; once the hook returned they are marked usable (``assigned``) and
            resumed, and fetched from their committed offsets. A revoke cancels a hook still
            running and waits for it to end, so the hook must leave no state half changed
            when cancelled (``ChangelogTable.restore`` applies what it read only at its end).
            Revoked partitions are given up only after the batch in progress finished (or was
            given up: ``guard_batch``'s ``abandon``) and the finished ones were committed,
            within a time limit (``_revoked``).
        prepare: awaited with each batch before ``handler`` and under the same retry rules
            (e.g. ``Codec.resolve_unknown`` fetching writer schemas). Settable after
            construction.
        on_unreadable: awaited, inside the batch and under the same retry rules, for each
            offset skipped because the client cannot read its record (``_fetch``); such
            offsets are logged and counted (``switchboard_stage_errors_total``, error type
            ``UnreadableRecord``) either way. Settable after construction.
        max_records: most records per batch.
    """

    def __init__(
        self,
        settings: Settings,
        stage: str,
        topics: Iterable[str],
        handler: Handler,
        *,
        on_assigned: PartitionsHook | None = None,
        prepare: Handler | None = None,
        on_unreadable: UnreadableHook | None = None,
        max_records: int = BATCH_MAX,
    ) -> None:
        self.stage = stage
        self.topics = list(topics)
        self.handler = handler
        self.on_assigned = on_assigned
        self.prepare = prepare
        self.on_unreadable = on_unreadable
        self.max_records = max_records
        self.lock = asyncio.Lock()
        """Held while a batch is handled, and while partitions are revoked."""
        session_ms = int(settings.session_timeout_s * 1000)
        rebalance_ms = max(session_ms * 2, 10_000)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.broker_list(),
            group_id=f"{settings.app_id}.{stage}",
            client_id=f"{settings.app_id}.{stage}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.fetch_max_wait_ms or DEFAULT_FETCH_MAX_WAIT_MS,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(500, session_ms // 6),
            rebalance_timeout_ms=rebalance_ms,
            # one assignor only: aiokafka 0.14.0 sends a JoinGroup per assignor given
            partition_assignment_strategy=(
                CoPartitionedAssignor(settings.worker_id or default_worker_id()),
            ),
        )
        self._stopping = asyncio.Event()
        self._revoking = asyncio.Event()
        """Set while partitions wait to be revoked: the batch in progress is given up after
        ``abandon_after_s`` rather than holding the rebalance past its timeout."""
        rebalance_s = rebalance_ms / 1000
        self.abandon_after_s = 0.35 * rebalance_s
        """35 % of the rebalance timeout (s): a revoke gives up the batch in progress this long
        after it began (``_revoked``)."""
        self.finish_after_s = 0.6 * rebalance_s
        """60 % of the rebalance timeout (s): the batches handled before the revoke (and the
        one in progress, when it returned in time) must be finished this long after it began,
        leaving a batch that returned just inside its grace time for its acknowledgements and
        changelog writes (``_revoked``)."""
        self.revoke_commit_s = 0.15 * rebalance_s
        """Longest a revoke waits for its commit after that (s), so the whole revoke ends
        within three quarters of the rebalance timeout (``_revoked``)."""
        self._closing = False
        """Set by ``close``: no ``on_assigned`` hook starts any more."""
        self.assigned: set[TopicPartition] = set()
        """Partitions whose batches are handled: assigned, and their ``on_assigned`` hook done."""
        self._restoring: set[TopicPartition] = set()
        """Assigned partitions paused until the ``on_assigned`` hook running for them is done."""
        self._hook_task: asyncio.Task[None] | None = None
        self._generation = 0
        """Revokes so far: the records of a fetch belong to the assignment of its generation."""
        self._revoked_in: dict[TopicPartition, int] = {}
        """Per partition, the generation its last revoke began (records fetched before are
        the old assignment's: its next owner, maybe this member again, fetches them anew)."""
        self._fetched_in = 0
        """The generation the last ``_fetch`` took its records in."""
        self._outstanding: list[asyncio.Task[None]] = []
        self._finished: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._skipped: dict[TopicPartition, list[_Skip]] = {}
        """Offsets skipped as unreadable since the last batch was handled, by partition."""
        self._refetched: dict[TopicPartition, int] = {}
        """Offset of the record batch that failed its CRC check last, by partition: fetched
        again once; skipped when it fails there again."""

    async def start(self) -> None:
        """Connect and subscribe (the group join happens in the background)."""
        await self.consumer.start()
        self.consumer.subscribe(self.topics, listener=_Listener(self))

    def stop_soon(self) -> None:
        """Ask ``run`` to return after the batch in progress."""
        self._stopping.set()

    async def close(self) -> None:
        """Stop an ``on_assigned`` hook still running, then leave the group (after ``run``
        returned)."""
        self._closing = True
        await self._stop_hook()
        await self.consumer.stop()
        await self._stop_hook()  # one an assignment during the stop started

    async def run(self) -> None:
        """Fetch, handle and commit batches until ``stop_soon`` is called; then finish and
        commit what was handled."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        committer = asyncio.ensure_future(self._commit_every(COMMIT_INTERVAL_S))
        try:
            while not self._stopping.is_set():
                fetch = asyncio.ensure_future(self._fetch(1000, self.max_records))
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    break
                batch = fetch.result()
                if batch or self._skipped:
                    generation = await self._fill(batch, self._fetched_in)
                    await self._handle(batch, generation)
            await self._stop_hook()
            await self._finish_outstanding()
            await self._commit()
        finally:
            stopping.cancel()
            committer.cancel()

    async def _fill(self, batch: dict[TopicPartition, list[Record]], generation: int) -> int:
        """Top up a small batch, fetched in ``generation``, with what arrives within
        ``BATCH_WITHIN_MS``; return the generation of the records now in it.

        Fewer, larger batches mean fewer fetch and produce requests per record: the client
        does not fetch a partition again while its records wait in the buffer. That matters
        on any broker and decides throughput on one whose cost per request grows with the
        number of batches in a partition (Tansu's memory storage, BENCHMARKS.md). Records of
        partitions revoked meanwhile are taken out first (``_drop_revoked``).
        """
        count = sum(len(records) for records in batch.values())
        if count >= self.max_records or BATCH_WITHIN_MS <= 0:
            return generation
        await asyncio.sleep(BATCH_WITHIN_MS / 1000)
        more = await self._fetch(0, self.max_records - count)
        if self._fetched_in != generation:
            self._drop_revoked(batch, generation)
        for tp, records in more.items():
            batch.setdefault(tp, []).extend(records)
        return self._fetched_in

    def _fresh(self, tp: TopicPartition, generation: int) -> bool:
        """Whether records of ``tp`` fetched in ``generation`` belong to its current
        assignment (it was not revoked since)."""
        return self._revoked_in.get(tp, 0) <= generation

    def _drop_revoked(self, batch: dict[TopicPartition, list[Record]], generation: int) -> None:
        """Take out of ``batch`` (fetched in ``generation``) the records of partitions revoked
        since. They are not lost: a new assignment starts from the committed offset."""
        for tp in [tp for tp in batch if not self._fresh(tp, generation)]:
            del batch[tp]

    async def _fetch(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        """``getmany``: the records that arrive within ``timeout_ms`` ms, at most
        ``max_records``, by partition; stepping over records the client cannot read.

        Such a record (``unreadable``: a header key that is not UTF-8, a corrupt batch)
        would otherwise fail every fetch of its partition, so the worker would exit and
        fail again at the same offset after each restart. A record batch failing its CRC
        check is first fetched once more (it may have been corrupted on the way, not on the
        broker's disk); it is skipped when it fails again at the same offset. Its partition's
        position moves past it (and past the rest of its record batch when the batch cannot
        be parsed beyond it); the skipped offsets are logged, counted, and reported by the
        next ``_handle`` (``on_unreadable``), whose batch covers them: they are committed only
        once it finished. The records the failed call had taken are returned, so none is lost.

        The generation the records were taken in is left in ``_fetched_in``. Records of a
        partition whose ``on_assigned`` hook is still running are not returned: its position is
        moved back to the first of them (``_hold_back``).

        Raises:
            KafkaError: the fetch failed otherwise (e.g. a coordinator or authorization error).
        """
        try:
            fetched: dict[TopicPartition, list[Record]] = await self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
            return self._hold_back(fetched)
        except Exception as exc:
            found = unreadable(exc)
            if found is None:
                raise
        tp, skip, taken = found
        if step_over(self.consumer, self.stage, tp, skip, self._refetched):
            self._skipped.setdefault(tp, []).append(skip)
        return self._hold_back(taken)

    def _hold_back(
        self, fetched: dict[TopicPartition, list[Record]]
    ) -> dict[TopicPartition, list[Record]]:
        """Note the generation ``fetched`` was taken in (``_fetched_in``), and give back the
        records of partitions still paused for their ``on_assigned`` hook: seek each to its
        first such offset, so that it is fetched again once resumed rather than lost.

        aiokafka hands out nothing of a paused partition (its fetcher drops what it buffered
        for one without moving the position), and the partitions are paused in the
        assignment callback before any fetch of theirs can complete; this only keeps the
        rule "nothing handled before the hook, nothing lost" from depending on that.
        Synchronous: no fetch can run between the one that took the records and the seek.
        """
        self._fetched_in = self._generation
        if self._refetched:  # read past the batch fetched again: a later failure there is new
            for tp, records in fetched.items():
                again = self._refetched.get(tp)
                if again is not None and records and records[-1].offset >= again:
                    del self._refetched[tp]
        for tp in [tp for tp, records in fetched.items() if tp in self._restoring and records]:
            records = fetched.pop(tp)
            with contextlib.suppress(IllegalStateError):
                self.consumer.seek(tp, records[0].offset)
            log.warning(
                "%s: %s[%d] offsets %d to %d were fetched before its assignment hook finished;"
                " they are fetched again after it",
                self.stage,
                tp.topic,
                tp.partition,
                records[0].offset,
                records[-1].offset,
            )
        return fetched

    async def _handle(self, batch: dict[TopicPartition, list[Record]], generation: int) -> None:
        """Handle ``batch``, fetched in ``generation`` (the count of revokes when its records
        were taken, ``_fetched_in``), with the offsets skipped since the last batch; start
        finishing it (``_finish``).

        Only records of partitions in ``assigned`` that were not revoked since the fetch are
        handled. The others belong to another member now, or to a later assignment of this
        one that fetches them again from the committed offset — handled now, they would be
        handled twice, out of order with their own replay.
        """
        skipped, self._skipped = self._skipped, {}
        while len(self._outstanding) >= PIPELINE_DEPTH:
            await asyncio.wait(self._outstanding[:1])
            self._outstanding = [t for t in self._outstanding if not t.done()]
        async with self.lock:

            def mine(tp: TopicPartition) -> bool:
                return tp in self.assigned and self._fresh(tp, generation)

            owned = {tp: rs for tp, rs in batch.items() if rs and mine(tp)}
            skips = {tp: s for tp, s in skipped.items() if mine(tp)}
            if not owned and not skips:
                return
            records = [record for tp_records in owned.values() for record in tp_records]
            ctx = BatchContext()

            async def attempt() -> None:
                ctx.acks.clear()
                ctx.after.clear()
                if self.prepare is not None and records:
                    await self.prepare(records)
                with handling(ctx):
                    await self._report_unreadable(skips)
                    if records:
                        await self.handler(records)

            try:
                await guard_batch(
                    self.stage, attempt, abandon=self._revoking, grace_s=self.abandon_after_s
                )
            except BatchAbandoned as exc:
                self._rewind(owned, skips)
                child(STAGE_ERRORS, self.stage, "BatchAbandoned").inc()
                log.warning("%s: batch given up (%s); it is handled again", self.stage, exc)
                return
            offsets = _next_offsets(owned, skips)
            previous = self._outstanding[-1] if self._outstanding else None
            task = asyncio.ensure_future(self._finish(ctx, offsets, previous))
            self._outstanding.append(task)

    async def _report_unreadable(self, skips: dict[TopicPartition, list[_Skip]]) -> None:
        """Await ``on_unreadable`` for every skipped offset, in offset order per partition."""
        hook = self.on_unreadable
        if hook is None:
            return
        for tp, tp_skips in skips.items():
            for skip in tp_skips:
                for offset in range(skip.first, skip.end):
                    await hook(tp.topic, tp.partition, offset, skip.reason)

    def _rewind(
        self, batch: dict[TopicPartition, list[Record]], skips: dict[TopicPartition, list[_Skip]]
    ) -> None:
        """Fetch a given-up batch again from its first offsets (of records or skipped ones),
        so no later batch of a partition this member still holds commits past it. With
        aiokafka's eager rebalance every partition is revoked and resumes from its committed
        offset anyway; the seek drops the records buffered for the old assignment."""
        firsts = {tp: records[0].offset for tp, records in batch.items()}
        for tp, tp_skips in skips.items():
            first = min(skip.first for skip in tp_skips)
            firsts[tp] = min(first, firsts.get(tp, first))
        for tp, offset in firsts.items():
            with contextlib.suppress(IllegalStateError):  # no longer assigned here
                self.consumer.seek(tp, offset)

    async def _finish(
        self,
        ctx: BatchContext,
        offsets: dict[TopicPartition, int],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Wait for the batch's acknowledgements, run its after-actions in batch order, and
        mark its offsets finished. A produce that failed after the client's own retries (the
        broker unreachable for ``request_timeout_ms``) stops the worker without committing:
        later batches were already handled on top of this one, so only a restart from the
        last commit is safe."""
        try:
            await _all_acknowledged(ctx.acks)
            if previous is not None:
                await previous
            if ctx.after:
                with handling(BatchContext()) as after:
                    for action in ctx.after:
                        await action()
                await _all_acknowledged(after.acks)
        except Exception:
            _exit_without_commit(
                f"{self.stage}: records of a batch were not acknowledged", exc_info=True
            )
        self._finished.update(offsets)

    async def _finish_outstanding(self) -> None:
        if self._outstanding:
            await asyncio.wait(self._outstanding)
        self._outstanding = []

    async def _finish_outstanding_by(self, deadline: float) -> None:
        """Wait until the outstanding batches finished (acknowledged, after-actions run), at
        most until ``deadline`` (``time.monotonic()``, s); past it, end the worker at once
        without committing (status 70), as when a batch's produce fails.

        Going on instead would hold the rebalance past its timeout, and the after-actions
        still to run (changelog writes) would then be sent for partitions the coordinator
        has given to another member, which restores them meanwhile.
        """
        pending = [task for task in self._outstanding if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if any(not task.done() for task in pending):
            _exit_without_commit(
                f"{self.stage}: batches handled before a revoke were still not finished "
                f"(records unacknowledged or changelog writes pending) {self.abandon_after_s:g}"
                " s after it began; going on would hold the rebalance past its timeout and"
                " write changelog records for partitions another member restores by then"
            )
        self._outstanding = []

    async def _commit_by(self, deadline: float) -> None:
        """``_commit``, given up at ``deadline`` (``time.monotonic()``, s): the partitions'
        next owner then replays the finished batches from the last commit, and the next
        stages drop the repeated outputs by id (aiokafka retries a commit as long as the
        broker answers with retriable errors)."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                await self._commit()
        except TimeoutError:
            log.warning(
                "%s: no time left to commit before the partitions are revoked; their next"
                " owner replays the batches finished since the last commit",
                self.stage,
            )
        except KafkaError as exc:
            log.warning(
                "%s: commit failed before the partitions are revoked (%r); their next owner"
                " replays the batches finished since the last commit",
                self.stage,
                exc,
            )

    async def _commit_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._commit()
            except Exception:  # the next round tries again; a crash meanwhile replays more
                log.exception("%s: periodic commit failed", self.stage)

    async def _commit(self) -> None:
        due = {
            tp: offset
            for tp, offset in self._finished.items()
            if self._committed.get(tp) != offset and tp in self.assigned
        }
        if not due:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in due.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced under us: the new owner replays from the last commit,
            # and the replayed outputs carry the same ids (dropped downstream).
            log.warning("%s: commit failed after a rebalance: %s", self.stage, exc)
            return
        self._committed.update(due)

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        """aiokafka's assignment callback; returns at once, because aiokafka restarts the
        group's heartbeat only once it returned (``GroupCoordinator.ensure_active_group``):
        a long restore in here would get the member evicted for missing its session.

        Without an ``on_assigned`` hook the new partitions are usable at once. With one, they
        are paused — before anything awaits, so no fetch of theirs completes first — and the
        hook runs in a task of its own (``_run_hook``), which marks them usable and resumes
        them once it returned: no batch of a partition is handled against state not restored
        yet, and aiokafka fetches them from their committed offsets then.
        """
        log.info("%s: assigned %s", self.stage, _describe(assigned))
        # aiokafka's rebalances are eager: everything was revoked first, all of it is new
        # (also when the revoke's bookkeeping failed half-way)
        new = set(assigned)
        hook = self.on_assigned
        if hook is None:
            self.assigned = new
            return
        self.assigned = set()
        self.consumer.pause(*new)
        await self._stop_hook()  # none runs: aiokafka revokes everything before assigning
        if self._closing:
            return  # stays paused: the consumer is leaving the group
        self._restoring = set(new)
        self._hook_task = asyncio.ensure_future(self._run_hook(hook, set(assigned), new))
        self._hook_task.add_done_callback(functools.partial(_hook_ended, self.stage))

    async def _run_hook(
        self, hook: PartitionsHook, assigned: set[TopicPartition], new: set[TopicPartition]
    ) -> None:
        """Await ``hook(assigned)``, then mark ``new`` usable and resume it.

        Under ``guard_batch``'s rules, as a batch's: a transient failure of the hook (a
        restore's marker not acknowledged) is retried, anything else (a restore timing out, a
        changelog record that does not decode) exits the worker — else the stage would own
        partitions it never handles. Marking and resuming do not await: a revoke that cancels
        this task finds either both done or neither.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(ASSIGN_HOOK_LIMIT_S):
                await guard_batch(f"{self.stage}.assign", lambda: hook(set(assigned)))
        except TimeoutError:
            _exit_without_commit(
                f"{self.stage}: the assignment hook (a table restore) did not finish within "
                f"{ASSIGN_HOOK_LIMIT_S:g} s, its transient errors retried; the partitions "
                f"{_describe(new)} would stay paused"
            )
        self.assigned |= new
        self._restoring -= new
        for tp in new:
            with contextlib.suppress(IllegalStateError):  # (not revoked: this task would
                self.consumer.resume(tp)  # have been cancelled)
        log.info(
            "%s: %s resumed after the assignment hook (%.2f s)",
            self.stage,
            _describe(new),
            time.monotonic() - started,
        )

    async def _stop_hook(self) -> None:
        """Cancel the ``on_assigned`` hook if it still runs, and wait until it ended; its
        partitions stay unused until the next assignment. A hook still running
        ``CANCELLED_BATCH_WAIT_S`` s after it was cancelled ends the worker (status 70)."""
        task, self._hook_task = self._hook_task, None
        if task is not None and not task.done():
            await _cancel_or_exit(task, f"{self.stage}: the assignment hook")
            log.info(
                "%s: assignment hook cancelled before it finished; %s left unused",
                self.stage,
                _describe(self._restoring),
            )
        self._restoring = set()

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """aiokafka's revocation callback (its rebalances are eager: every partition is
        revoked before every assignment). It must end well within the rebalance timeout, or
        the coordinator gives the partitions to other members while this one still writes:

        1. an ``on_assigned`` hook still running is cancelled and waited for (a table keeps
           nothing of a restore it did not finish);
        2. the batch in progress is given up ``abandon_after_s`` (35 % of the rebalance
           timeout) after the revoke began (``guard_batch``: nothing of it committed, the next
           owner replays it);
        3. the batches handled before it — and it, when it returned in time — must be finished
           (acknowledged, changelog written) ``finish_after_s`` (60 %) after the revoke began,
           which leaves a batch returning just inside its grace time for its acknowledgements.
           If not, the worker exits without committing (``_finish_outstanding_by``): going on,
           it would write changelog records for partitions another member restores;
        4. the finished batches are committed within ``revoke_commit_s`` (15 %) more, or not at
           all (``_commit_by``; a commit that fails is given up the same way).

        So a revoke ends within three quarters of the rebalance timeout, the rest left for the
        rejoin request. The deadlines are counted from the start of the revoke, so nothing
        later waits longer because something earlier was slow. The one stretch: a hook or
        batch slow to end once cancelled may hold the lock up to ``CANCELLED_BATCH_WAIT_S``
        past ``abandon_after_s`` (longer ends the worker). The partitions leave ``assigned``
        whatever happens here, so the next assignment starts from nothing.
        """
        started = time.monotonic()
        self._generation += 1
        for tp in revoked:
            self._revoked_in[tp] = self._generation
            self._skipped.pop(tp, None)
            self._refetched.pop(tp, None)
        self._revoking.set()  # a batch stuck retrying or waiting is given up
        try:
            await self._stop_hook()
            async with self.lock:  # the batch being handled finishes (or is given up) first
                try:
                    finish_by = started + self.finish_after_s
                    await self._finish_outstanding_by(finish_by)
                    await self._commit_by(finish_by + self.revoke_commit_s)
                finally:  # also when the commit failed: the partitions are not ours any more
                    self.assigned -= revoked
                    for tp in revoked:
                        self._finished.pop(tp, None)
                        self._committed.pop(tp, None)
        finally:
            self._revoking.clear()


def _hook_ended(stage: str, task: asyncio.Task[None]) -> None:
    """Done callback of the ``on_assigned`` hook's task: anything it raised other than its
    cancellation (which ``guard_batch`` did not already turn into an exit) ends the worker,
    since its partitions would otherwise stay paused for ever."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        _exit_without_commit(f"{stage}: the assignment hook failed: {exc!r}")


async def _all_acknowledged(acks: list[asyncio.Future[Any]]) -> None:
    """Wait for every delivery report; raise the first failure (a KafkaError).

    One future after the other rather than ``gather``: the records of a batch are acknowledged
    together, so most futures are done by the time they are looked at, and ``gather`` would
    add a callback and a wrapper per record.
    """
    for ack in acks:
        if not ack.done():
            await asyncio.wait((ack,))
        if ack.cancelled():
            raise KafkaError("produce cancelled before it was acknowledged")
        failure = ack.exception()
        if failure is not None:
            if isinstance(failure, KafkaError):
                raise failure
            raise KafkaError(f"produce failed: {failure!r}") from failure


def _describe(tps: Iterable[TopicPartition]) -> str:
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return ", ".join(f"{t}{sorted(p)}" for t, p in sorted(by_topic.items())) or "nothing"
