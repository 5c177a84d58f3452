"""Helpers every agent uses: sending records with metrics and traceparent, dead-lettering."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from connectors.errors import ConnectorError
from processors.backoff import backoff_delay
from processors.tracing import TRACEPARENT, child_traceparent
from schemas.errors import SchemaRegistryError
from schemas.models import AvroRecord, DeadLetter, Header, utcnow
from streams.metrics import DEADLETTERS, RECORDS_OUT, STAGE_ERRORS
from streams.runtime import Runtime

__all__ = [
    "BATCH_MAX",
    "BATCH_WITHIN_S",
    "RawMessage",
    "batches",
    "dead_letter",
    "guard_batch",
    "headers_of",
    "internal_error",
    "is_transient",
    "parse_each",
    "remember_after_ack",
    "send_record",
    "traceparent_of",
]

log = logging.getLogger(__name__)

RawMessage = Any
"""A faust ``Message`` (topic, partition, offset, key, value, headers); faust ships no stubs."""


def headers_of(message: RawMessage) -> list[tuple[str, bytes | None]]:
    """The record's headers as (key, value) pairs, whatever shape the client gave them in."""
    raw = message.headers
    if not raw:
        return []
    items: Iterable[tuple[str, bytes | None]] = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v) for k, v in items]


def traceparent_of(message: RawMessage) -> bytes | None:
    """The record's W3C traceparent header value, if any."""
    for key, value in headers_of(message):
        if key.lower() == TRACEPARENT:
            return value
    return None


async def send_record(
    rt: Runtime,
    topic: Any,
    record: AvroRecord,
    *,
    key: str | bytes | None,
    stage: str,
    parent: RawMessage | None = None,
) -> Awaitable[Any]:
    """Encode ``record`` and send it on ``topic`` with a child traceparent of ``parent``.

    The send is buffered by the producer; Faust flushes the producer before it commits the
    consumed offset, so a crash before the flush replays the input (at-least-once).

    Returns:
        An awaitable that resolves to the record's metadata once the broker acknowledged it.
    """
    trace = child_traceparent(traceparent_of(parent) if parent is not None else None)
    key_bytes = key.encode() if isinstance(key, str) else key
    name = topic.get_topic_name()
    # Straight to the app's producer, past Faust's Topic.send bookkeeping (a measurable share
    # of the CPU per record). Faust still flushes this producer before it commits offsets.
    ack: Awaitable[Any] = await topic.app.producer.send(
        name, key_bytes, rt.codec.encode(record), None, None, [(TRACEPARENT, trace.encode())]
    )
    RECORDS_OUT.labels(stage, name).inc()
    return ack


BATCH_MAX = 500
"""Most records a stage handles per batch: one Redis round trip, one wait for acks."""
BATCH_WITHIN_S = 0.005
"""Longest a partial batch waits for more records (s)."""


def batches(stream: Any) -> Any:
    """The stream's events in batches (Faust ``take_events``), acknowledged per batch once the
    loop body returns — cheaper than per-event iteration, and the unit ``guard_batch`` runs."""
    return stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)


TRANSIENT_RETRY_MAX_S = 30.0
"""Longest pause between two tries of a batch that failed on a transient error (s)."""


def is_transient(exc: BaseException) -> bool:
    """Errors the same batch may get past by trying again: Redis, the schema registry, the
    broker (a produce that was not acknowledged)."""
    if isinstance(exc, ConnectorError | SchemaRegistryError):
        return exc.retriable
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


async def guard_batch(stage: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run one batch so that its records are never acknowledged without their outputs.

    Faust acknowledges the events of a ``take_events`` batch when the batch's body returns *or
    raises*, so an exception must not leave it. Per-record failures are dead-lettered by the
    stages themselves; what reaches here failed for the whole batch. A transient error (Redis
    down, schema registry unreachable, a produce not acknowledged) is retried with capped
    exponential backoff — backpressure: the partition waits, nothing is dropped. Re-running a
    batch re-creates outputs with the same ids, which the next stages drop. Anything else is a
    bug: the worker exits at once (status 70) without committing, and its restart replays the
    batch.
    """
    attempt = 0
    while True:
        try:
            await body()
            return
        except Exception as exc:
            if not is_transient(exc):
                log.critical(
                    "%s: unrecoverable error in a batch; exiting without commit",
                    stage,
                    exc_info=True,
                )
                logging.shutdown()
                os._exit(70)
            delay = backoff_delay(attempt, initial_s=0.5, max_s=TRANSIENT_RETRY_MAX_S)
            STAGE_ERRORS.labels(stage, type(exc).__name__).inc()
            log.warning("%s: batch failed (%s); retrying in %.1f s", stage, exc, delay)
            attempt += 1
            await asyncio.sleep(delay)


async def internal_error(
    rt: Runtime, topics: dict[str, Any], message: RawMessage, exc: Exception, *, stage: str
) -> None:
    """Count, log and dead-letter a record whose processing raised unexpectedly.

    The record goes to the dead-letter topic with stage ``<stage>.internal`` so that a bad
    record never stops its partition and nothing is lost. A transient error (see
    ``is_transient``) is re-raised instead, for ``guard_batch`` to retry the batch.
    """
    if is_transient(exc):
        raise exc
    STAGE_ERRORS.labels(stage, type(exc).__name__).inc()
    log.exception("%s failed on %s[%s]@%s", stage, message.topic, message.partition, message.offset)
    await dead_letter(
        rt,
        topics["deadletter"],
        message,
        stage=f"{stage}.internal",
        reason=f"unexpected error: {exc!r}",
        error_type=type(exc).__name__,
    )


T = TypeVar("T")


async def parse_each(
    rt: Runtime,
    topics: dict[str, Any],
    messages: Sequence[RawMessage],
    parse: Callable[[RawMessage], Awaitable[T | None]],
    *,
    stage: str,
) -> list[tuple[RawMessage, T]]:
    """Apply ``parse`` to each record of a batch; keep (record, result) for the good ones.

    ``parse`` dead-letters what it rejects and returns None; an unexpected exception
    dead-letters the record here (``internal_error``), so one bad record never stops a batch.
    """
    parsed: list[tuple[RawMessage, T]] = []
    for message in messages:
        try:
            result = await parse(message)
        except Exception as exc:  # a bad record must never stop the partition
            await internal_error(rt, topics, message, exc, stage=stage)
            continue
        if result is not None:
            parsed.append((message, result))
    return parsed


async def dead_letter(
    rt: Runtime,
    topic: Any,
    message: RawMessage,
    *,
    stage: str,
    reason: str,
    error_type: str,
    message_id: str | None = None,
    tenant: str | None = None,
) -> None:
    """Send the consumed record, untouched, to the dead-letter topic with stage and reason."""
    headers: Sequence[tuple[str, bytes | None]] = headers_of(message)
    value = message.value
    record = DeadLetter(
        dead_letter_id=str(uuid.uuid4()),
        stage=stage,
        reason=reason,
        error_type=error_type,
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        message_id=message_id,
        tenant=tenant,
        original_key=message.key,
        original_value=value if isinstance(value, bytes) else None,
        original_headers=[Header(key=k, value=v) for k, v in headers],
        created_at=utcnow(),
    )
    await send_record(rt, topic, record, key=message.key, stage=stage, parent=message)
    DEADLETTERS.labels(stage, error_type).inc()
    log.warning(
        "dead-lettered %s[%s]@%s at %s: %s",
        message.topic,
        message.partition,
        message.offset,
        stage,
        reason,
    )


_background: set[asyncio.Task[None]] = set()


def remember_after_ack(
    rt: Runtime, keys: list[str], ttl_s: int, acks: list[Awaitable[Any]]
) -> None:
    """Record ``keys`` as done (Redis, ``ttl_s``) once the broker acknowledged ``acks``.

    Marking earlier would lose work if the worker died before the producer flushed: the
    replayed record would look like a duplicate. Runs in the background.
    """

    async def remember() -> None:
        try:
            await asyncio.gather(*acks)
            await rt.store.mark_many(keys, ttl_s)
        except Exception:
            log.exception("could not record %d idempotency key(s)", len(keys))

    task = asyncio.ensure_future(remember())
    _background.add(task)
    task.add_done_callback(_background.discard)
