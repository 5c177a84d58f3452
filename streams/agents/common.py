"""Helpers every agent uses: sending records with metrics and traceparent, dead-lettering."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from processors.tracing import TRACEPARENT, child_traceparent
from schemas.errors import EncodeError
from schemas.models import AvroRecord, DeadLetter, Header, utcnow
from streams.metrics import DEADLETTERS, RECORDS_OUT, STAGE_ERRORS, child
from streams.runtime import Runtime
from streams.transport import (
    BatchContext,
    Record,
    after_acknowledged,
    cooperate,
    handling,
    is_transient,
    record_bytes,
    track_acknowledgement,
)

__all__ = [
    "DEAD_LETTER_HEADROOM_BYTES",
    "RawMessage",
    "UnmarkedKeys",
    "dead_letter",
    "encoded_size",
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
    key_bytes = key.encode() if isinstance(key, str) else key
    return await _send_encoded(
        rt,
        topic,
        rt.codec.encode(record),
        key=key_bytes,
        headers=_trace_headers(parent),
        stage=stage,
    )


def encoded_size(rt: Runtime, record: AvroRecord, *, key: bytes | None) -> int:
    """Bytes ``send_record`` sends for ``record`` under ``key`` (``record_bytes`` of the key,
    the encoded value and a traceparent header, whose length is fixed), to compare with a
    topic's limit (``Producer.limit``)."""
    return record_bytes(key, rt.codec.encode(record), _trace_headers(None))


def _trace_headers(parent: RawMessage | None) -> list[tuple[str, bytes]]:
    trace = child_traceparent(traceparent_of(parent) if parent is not None else None)
    return [(TRACEPARENT, trace.encode())]


async def _send_encoded(
    rt: Runtime,
    topic: str,
    value: bytes,
    *,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
    stage: str,
) -> Awaitable[Any]:
    ack = await rt.producer.send(topic, value, key=key, headers=headers)
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


DEAD_LETTER_HEADROOM_BYTES = 1024
"""Bytes a dead letter keeps free below the largest record its topic takes, on top of the
record and batch overhead and headers that aiokafka's own size estimate counts."""

_MINIMAL_REASON_CHARS = 2000
"""Longest reason (characters) kept in a dead letter stripped of the original record."""


def _original_note(value: bytes | None) -> str:
    if value is None:
        return "the original value was null"
    return f"the original value was {len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()}"


def _stripped(letter: DeadLetter, *, reason: str, why: str, original: bytes | None) -> DeadLetter:
    """``letter`` without the original key, value and headers, its reason ``reason``
    (shortened) with ``why`` and the size and SHA-256 of ``original`` (the full value)."""
    if len(reason) > _MINIMAL_REASON_CHARS:
        reason = reason[:_MINIMAL_REASON_CHARS] + "..."
    note = _original_note(original)
    return letter.model_copy(
        update={
            "reason": f"{reason} [{why}: original key, value and headers left out; {note}; "
            "the original is at source_topic/source_partition/source_offset]",
            "original_key": None,
            "original_value": None,
            "original_headers": [],
        }
    )


def _fit(
    rt: Runtime,
    topic: str,
    letter: DeadLetter,
    key: bytes | None,
    headers: list[tuple[str, bytes]],
) -> tuple[DeadLetter, bytes, bytes | None]:
    """``letter`` encoded to fit the largest record ``topic`` takes (``Producer.limit``: the
    producer's ``max_request_size``, or the topic's lower ``max.message.bytes``) less
    ``DEAD_LETTER_HEADROOM_BYTES``, with the record key to send it with.

    Unchanged when it fits. Otherwise its ``original_value`` is cut to the longest prefix that
    fits, and the reason says so, with the full value's size in bytes and SHA-256 (the original
    stays at ``source_topic``/``source_partition``/``source_offset``). When even an empty
    value does not fit (a huge key, headers or reason), the letter keeps none of the original
    record and is sent without a key.

    Raises:
        EncodeError, SchemaError: the codec could not encode the letter.
    """
    limit = rt.producer.limit(topic)
    budget = limit - DEAD_LETTER_HEADROOM_BYTES
    encoded = rt.codec.encode(letter)
    if record_bytes(key, encoded, headers) <= budget:
        return letter, encoded, key
    original = letter.original_value
    full = len(encoded)
    if original is not None:
        digest = hashlib.sha256(original).hexdigest()

        def note(kept: int) -> str:
            return (
                f"{letter.reason} [dead letter of {full} bytes exceeds the largest record "
                f"{topic} takes ({limit} bytes): original_value truncated to its first "
                f"{kept} of {len(original)} bytes; sha256 of the full original value "
                f"{digest}; the original is at source_topic/source_partition/source_offset]"
            )

        # The reason is measured with the longest ``kept`` it can give; the value's length
        # prefix (a zig-zag varint) takes at most 10 bytes more than for an empty value.
        shell = letter.model_copy(update={"reason": note(len(original)), "original_value": b""})
        room = budget - record_bytes(key, rt.codec.encode(shell), headers) - 10
        if room > 0:
            kept = original[:room]
            truncated = letter.model_copy(
                update={"reason": note(len(kept)), "original_value": kept}
            )
            encoded = rt.codec.encode(truncated)
            if record_bytes(key, encoded, headers) <= budget:
                return truncated, encoded, key
    minimal = _stripped(
        letter,
        reason=letter.reason,
        why=f"dead letter of {full} bytes exceeds the largest record {topic} takes ({limit} bytes)",
        original=original,
    )
    return minimal, rt.codec.encode(minimal), None


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
    """Send the consumed record (key, value bytes, headers) to the dead-letter topic, in a
    DeadLetter with stage and reason, keyed by the original key.

    Never a poison pill: a record too large to be dead-lettered does not stop the worker.

    - Size: a letter larger than the largest record the dead-letter topic takes
      (``Producer.limit``) less ``DEAD_LETTER_HEADROOM_BYTES`` carries only the first bytes
      of the original value that fit; its reason says so and gives the original size (bytes)
      and SHA-256 (see ``_fit``).
    - Send: a size or encoding error (``_TOO_LARGE``) raised by encoding or sending is logged
      at error level with the source topic/partition/offset and counted in
      ``switchboard_stage_errors_total`` (stage ``<stage>.deadletter``), and this returns
      normally: the batch goes on, and the original stays in its source topic.
    - Acknowledgement: the batch's offsets wait for the letter's acknowledgement as for any
      record. If the broker refuses it as too large (e.g. larger than the dead-letter
      topic's ``max.message.bytes``), a letter without the original key, value and headers
      is sent instead (its reason gives the refusal and the value's size and SHA-256); if
      that is refused too, it is logged and counted as above.

    Raises:
        Exception: anything else, e.g. a transient error (``is_transient``: the producer's
            buffer full for ``request_timeout_ms``) for ``guard_batch`` to retry the batch,
            or an authorization error, which stops the worker without commit. A failed
            acknowledgement other than a size refusal fails the batch's acknowledgements
            (the worker stops without committing, as for any record).
    """
    headers: Sequence[tuple[str, bytes | None]] = headers_of(message)
    value = message.value
    letter = DeadLetter(
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
    trace = _trace_headers(message)
    try:
        letter, encoded, key = _fit(rt, topic, letter, message.key, trace)
        # Sent outside the batch's acknowledgements: the batch waits for ``guarded`` instead,
        # which contains a refusal by the broker.
        with handling(BatchContext()):
            ack = await _send_encoded(rt, topic, encoded, key=key, headers=trace, stage=stage)
    except _TOO_LARGE as exc:
        _not_dead_lettered(message, stage, exc)
        return
    guarded = asyncio.ensure_future(
        _contain_refusal(rt, topic, message, letter, ack, stage=stage, reason=reason)
    )
    _guards.add(guarded)
    guarded.add_done_callback(_guards.discard)
    track_acknowledgement(guarded)
    child(DEADLETTERS, stage, error_type).inc()
    if letter.reason != reason:
        log.warning(
            "dead-lettered %s[%s]@%s at %s, cut to fit: %s",
            message.topic,
            message.partition,
            message.offset,
            stage,
            letter.reason,
        )
        return
    log.warning(
        "dead-lettered %s[%s]@%s at %s: %s",
        message.topic,
        message.partition,
        message.offset,
        stage,
        reason,
    )


_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, EncodeError)
"""What ``dead_letter`` contains: a letter too large for the producer or the broker, or one
the codec cannot write. Anything else (an authorization error, a bug) propagates: transient
errors retry the batch, the rest stop the worker without commit, as for any record."""

_guards: set[asyncio.Future[None]] = set()
"""Acknowledgement guards of dead letters not finished yet (a task needs a reference)."""


async def _contain_refusal(
    rt: Runtime,
    topic: str,
    message: RawMessage,
    letter: DeadLetter,
    ack: Awaitable[Any],
    *,
    stage: str,
    reason: str,
) -> None:
    """Wait for ``letter``'s acknowledgement; when the broker refused it for good, send the
    letter stripped of the original record instead, with ``reason`` (see ``dead_letter``).

    Raises:
        Exception: a transient failure of either acknowledgement.
    """
    try:
        await ack
        return
    except _TOO_LARGE as exc:
        refusal = exc
    log.error(
        "the broker refused the dead letter of %s[%s]@%s at %s (%s: %s); sending it without "
        "the original record",
        message.topic,
        message.partition,
        message.offset,
        stage,
        type(refusal).__name__,
        refusal,
    )
    minimal = _stripped(
        letter,
        reason=reason,
        why=f"the broker refused the dead letter ({type(refusal).__name__})",
        original=message.value if isinstance(message.value, bytes) else None,
    )
    try:
        with handling(BatchContext()):
            retry = await _send_encoded(
                rt,
                topic,
                rt.codec.encode(minimal),
                key=None,
                headers=_trace_headers(message),
                stage=stage,
            )
        await retry
    except _TOO_LARGE as exc:
        _not_dead_lettered(message, stage, exc)


def _not_dead_lettered(message: RawMessage, stage: str, exc: BaseException) -> None:
    child(STAGE_ERRORS, f"{stage}.deadletter", type(exc).__name__).inc()
    log.error(
        "could not dead-letter %s[%s]@%s at %s (%s: %s); the record is left at its source "
        "offset and the batch goes on",
        message.topic,
        message.partition,
        message.offset,
        stage,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )


class UnmarkedKeys:
    """Idempotency keys whose effect a finished batch applied but whose Redis marks are not
    written yet, kept in memory by one stage of one worker (``remember_after_ack``).

    A stage handles its next batch while the broker still acknowledges the last one's
    records, and marks are written only after that; the next batch looks here as well as in
    Redis so that a duplicate arriving meanwhile is recognised.

    Bounded: at most ``max_keys`` keys (each a short string: ~100 bytes with the set's
    overhead); adding more forgets the oldest first. Keys leave once their marks are written,
    so with ``max_keys`` at least the keys of all the batches whose acknowledgements can be
    outstanding at once, only keys whose marks could not be written (Redis failed; they stay
    to keep deduplicating) are ever forgotten this way.

    Raises:
        ValueError: ``max_keys`` < 1.
    """

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._keys: dict[str, None] = {}  # insertion-ordered: oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Iterable[str]) -> None:
        """Remember ``keys`` (as the newest), forgetting the oldest beyond ``max_keys``."""
        for key in keys:
            self._keys.pop(key, None)
            self._keys[key] = None
        excess = len(self._keys) - self.max_keys
        for key in list(itertools.islice(self._keys, max(0, excess))):
            del self._keys[key]

    def discard(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (absent ones are ignored)."""
        for key in keys:
            self._keys.pop(key, None)


def remember_after_ack(
    rt: Runtime, keys: list[str], ttl_s: int, *, unmarked: UnmarkedKeys | None = None
) -> None:
    """Record ``keys`` as done (Redis, ``ttl_s``) once every record the batch being handled
    produced was acknowledged, before its offsets are committed (``after_acknowledged``).

    Marking earlier would lose work if the worker died before the producer flushed: the
    replayed record would look like a duplicate. A Redis failure here is logged, not raised:
    the keys only save work, and the next stages drop replayed outputs by id.

    With ``unmarked``, the keys are added to it at once and leave it when their marks are
    written (they stay when writing failed), so the stage's next batches see them before
    Redis does. Call it as the handler's last step, when nothing can raise any more: a batch
    retried by ``guard_batch`` after it would skip these keys although nothing would wait for
    the acknowledgements of the failed try.

    Raises:
        RuntimeError: called outside a batch being handled by a ``BatchConsumer``.
    """

    async def remember() -> None:
        try:
            await rt.store.mark_many(keys, ttl_s)
        except Exception:
            log.exception("could not record %d idempotency key(s)", len(keys))
            return
        if unmarked is not None:
            unmarked.discard(keys)

    after_acknowledged(remember)
    if unmarked is not None:
        unmarked.add(keys)


async def dead_letter_unreadable(
    rt: Runtime,
    topic: str,
    stage: str,
    source_topic: str,
    partition: int,
    offset: int,
    reason: str,
) -> None:
    """Dead-letter a record the Kafka client could not read on ``topic``; with ``rt``,
    ``topic`` and ``stage`` bound, a ``BatchConsumer.on_unreadable`` hook. The letter is a
    placeholder with its source topic, partition and offset and no key, value or headers,
    stage ``<stage>.fetch``, error type ``UnreadableRecord``. The original stays in its
    source topic for whoever can read it."""
    placeholder: RawMessage = ConsumerRecord(
        topic=source_topic,
        partition=partition,
        offset=offset,
        timestamp=-1,
        timestamp_type=0,
        key=None,
        value=None,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=[],
    )
    await dead_letter(
        rt,
        topic,
        placeholder,
        stage=f"{stage}.fetch",
        reason=f"the Kafka client cannot read this record: {reason}",
        error_type="UnreadableRecord",
    )
