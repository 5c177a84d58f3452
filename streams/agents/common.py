"""Helpers every agent uses: sending records with metrics and traceparent, dead-lettering."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

from processors.tracing import TRACEPARENT, child_traceparent
from schemas.models import AvroRecord, DeadLetter, Header, utcnow
from streams.metrics import DEADLETTERS, RECORDS_OUT, STAGE_ERRORS, child
from streams.runtime import Runtime
from streams.transport import Record, after_acknowledged, cooperate, is_transient

__all__ = [
    "RawMessage",
    "dead_letter",
    "headers_of",
    "internal_error",
    "parse_each",
    "remember_after_ack",
    "send_record",
    "traceparent_of",
]

log = logging.getLogger(__name__)

RawMessage: TypeAlias = Record
"""A consumed record (topic, partition, offset, key, value, headers)."""


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
    topic: str,
    record: AvroRecord,
    *,
    key: str | bytes | None,
    stage: str,
    parent: RawMessage | None = None,
) -> Awaitable[Any]:
    """Encode ``record`` and send it on ``topic`` with a child traceparent of ``parent``.

    The send is buffered by the producer; inside a batch, the batch's offsets are committed
    only after this record was acknowledged (``streams.transport``), so a crash before that
    replays the input (at-least-once).

    Returns:
        An awaitable that resolves to the record's metadata once the broker acknowledged it.
    """
    trace = child_traceparent(traceparent_of(parent) if parent is not None else None)
    key_bytes = key.encode() if isinstance(key, str) else key
    ack = await rt.producer.send(
        topic, rt.codec.encode(record), key=key_bytes, headers=[(TRACEPARENT, trace.encode())]
    )
    child(RECORDS_OUT, stage, topic).inc()
    return ack


async def internal_error(
    rt: Runtime, topics: dict[str, str], message: RawMessage, exc: Exception, *, stage: str
) -> None:
    """Count, log and dead-letter a record whose processing raised unexpectedly.

    The record goes to the dead-letter topic with stage ``<stage>.internal`` so that a bad
    record never stops its partition and nothing is lost. A transient error (see
    ``is_transient``) is re-raised instead, for ``guard_batch`` to retry the batch.
    """
    if is_transient(exc):
        raise exc
    child(STAGE_ERRORS, stage, type(exc).__name__).inc()
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
    topics: dict[str, str],
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
    for index, message in enumerate(messages):
        await cooperate(index)
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
    topic: str,
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
    child(DEADLETTERS, stage, error_type).inc()
    log.warning(
        "dead-lettered %s[%s]@%s at %s: %s",
        message.topic,
        message.partition,
        message.offset,
        stage,
        reason,
    )


def remember_after_ack(rt: Runtime, keys: list[str], ttl_s: int) -> None:
    """Record ``keys`` as done (Redis, ``ttl_s``) once every record the batch being handled
    produced was acknowledged, before its offsets are committed (``after_acknowledged``).

    Marking earlier would lose work if the worker died before the producer flushed: the
    replayed record would look like a duplicate. A Redis failure here is logged, not raised:
    the keys only save work, and the next stages drop replayed outputs by id.
    """

    async def remember() -> None:
        try:
            await rt.store.mark_many(keys, ttl_s)
        except Exception:
            log.exception("could not record %d idempotency key(s)", len(keys))

    after_acknowledged(remember)
