"""``streams.agents.common.dead_letter`` never becomes a poison pill.

A producer double that checks record sizes the way aiokafka's ``send()`` does
(``DefaultRecordBatchBuilder.estimate_size_in_bytes`` against ``max_request_size``) and can
fail a send or its acknowledgement; the real Codec encodes and decodes the letters.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from prometheus_client import REGISTRY
from support.producer import RecordingProducer
from support.records import consumed

from schemas.models import DeadLetter
from streams.agents.common import (
    DEAD_LETTER_HEADROOM_BYTES,
    dead_letter,
    dead_letter_unreadable,
)
from streams.runtime import Runtime
from streams.settings import Settings, default_config_path, load_config
from streams.transport import BatchContext, Producer, handling

LIMIT = 64 * 1024
TOPIC = "t.deadletter"


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    runtime = Runtime(Settings(data_dir=tmp_path), load_config(default_config_path()))
    runtime.kafka = RecordingProducer(max_request_size=LIMIT)  # type: ignore[assignment]
    return runtime


def _producer(rt: Runtime) -> RecordingProducer:
    fake = rt.kafka
    assert isinstance(fake, RecordingProducer)
    return fake


def _record(value: bytes | None, *, key: bytes | None = b"key-1", offset: int = 41) -> Any:
    return consumed("t.inbound", 2, offset, value, key=key, headers=[("origin", b"test")])


async def _dead_letter_in_batch(rt: Runtime, message: Any) -> BatchContext:
    """Dead-letter ``message`` in a batch; wait for the batch's acknowledgements (raising
    the first failure, as ``streams.transport`` does before committing)."""
    ctx = BatchContext()
    with handling(ctx):
        await dead_letter(
            rt,
            TOPIC,
            message,
            stage="test.decode",
            reason="first byte 0x7f is neither '{' nor an Avro magic byte",
            error_type="DecodeError",
        )
    for ack in ctx.acks:
        await ack
    return ctx


def _letters(rt: Runtime) -> list[DeadLetter]:
    return [rt.codec.decode(s.value, DeadLetter) for s in _producer(rt).sent]


def _errors(stage: str, error_type: str) -> float:
    value = REGISTRY.get_sample_value(
        "switchboard_stage_errors_total", {"stage": stage, "error_type": error_type}
    )
    return value or 0.0


async def test_a_letter_that_fits_carries_the_record_untouched(rt: Runtime) -> None:
    original = b"\x7f" + b"a" * 1000
    ctx = await _dead_letter_in_batch(rt, _record(original))
    (letter,) = _letters(rt)
    assert letter.original_value == original
    assert letter.original_key == b"key-1"
    assert [(h.key, h.value) for h in letter.original_headers] == [("origin", b"test")]
    assert letter.reason == "first byte 0x7f is neither '{' nor an Avro magic byte"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "t.inbound",
        2,
        41,
    )
    assert _producer(rt).sent[0].key == b"key-1"
    assert len(ctx.acks) == 1  # the batch waits for the letter's acknowledgement


async def test_a_letter_over_the_producer_limit_is_cut_to_fit_with_size_and_hash(
    rt: Runtime,
) -> None:
    original = b"\x7f" + bytes(range(256)) * ((LIMIT - 200) // 256)
    assert len(original) < LIMIT  # the record itself was fine; its letter would not be
    await _dead_letter_in_batch(rt, _record(original))
    (sent,) = _producer(rt).sent
    assert sent.size <= LIMIT - DEAD_LETTER_HEADROOM_BYTES
    (letter,) = _letters(rt)
    assert letter.original_value is not None
    kept = len(letter.original_value)
    assert original.startswith(letter.original_value)
    assert LIMIT - DEAD_LETTER_HEADROOM_BYTES - 1000 < kept < len(original)
    assert letter.reason.startswith("first byte 0x7f")
    assert f"truncated to its first {kept} of {len(original)} bytes" in letter.reason
    assert hashlib.sha256(original).hexdigest() in letter.reason
    assert f"the largest record {TOPIC} takes ({LIMIT} bytes)" in letter.reason
    assert letter.original_key == b"key-1"
    assert (letter.source_partition, letter.source_offset) == (2, 41)


async def test_a_letter_is_cut_to_the_dead_letter_topics_lower_max_message_bytes(
    rt: Runtime,
) -> None:
    """A dead-letter topic created elsewhere with a smaller ``max.message.bytes``: the letter
    is cut to that, not to the producer's ``max_request_size`` (the broker would refuse it)."""
    lower = LIMIT // 4
    _producer(rt).record_limits[TOPIC] = lower
    original = b"\x7f" + b"b" * (LIMIT // 2)
    await _dead_letter_in_batch(rt, _record(original))
    (sent,) = _producer(rt).sent
    assert sent.size <= lower - DEAD_LETTER_HEADROOM_BYTES
    (letter,) = _letters(rt)
    assert letter.original_value is not None
    assert lower - DEAD_LETTER_HEADROOM_BYTES - 1000 < len(letter.original_value) < lower
    assert f"the largest record {TOPIC} takes ({lower} bytes)" in letter.reason


async def test_when_even_an_empty_value_does_not_fit_the_letter_keeps_only_where_it_is(
    rt: Runtime,
) -> None:
    huge_key = b"k" * LIMIT
    original = b"\x7f" + b"v" * 5000
    await _dead_letter_in_batch(rt, _record(original, key=huge_key))
    (sent,) = _producer(rt).sent
    assert sent.key is None
    (letter,) = _letters(rt)
    assert letter.original_key is None
    assert letter.original_value is None
    assert letter.original_headers == []
    assert f"the original value was {len(original)} bytes" in letter.reason
    assert hashlib.sha256(original).hexdigest() in letter.reason
    assert (letter.source_topic, letter.source_offset) == ("t.inbound", 41)


async def test_a_send_refused_as_too_large_is_logged_counted_and_does_not_raise(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    _producer(rt).raises.append(MessageSizeTooLargeError("larger than max_request_size"))
    before = _errors("test.decode.deadletter", "MessageSizeTooLargeError")
    with caplog.at_level(logging.ERROR, logger="streams.agents.common"):
        ctx = await _dead_letter_in_batch(rt, _record(b"\x7fbad"))
    assert ctx.acks == []
    assert _errors("test.decode.deadletter", "MessageSizeTooLargeError") == before + 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("t.inbound[2]@41" in r.getMessage() for r in errors), caplog.text


async def test_an_authorization_error_is_not_swallowed_but_stops_the_batch(rt: Runtime) -> None:
    _producer(rt).raises.append(TopicAuthorizationFailedError("not allowed"))
    with pytest.raises(TopicAuthorizationFailedError):
        await _dead_letter_in_batch(rt, _record(b"\x7fbad"))


async def test_a_transient_send_error_propagates_for_the_batch_to_be_retried(
    rt: Runtime,
) -> None:
    _producer(rt).raises.append(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await _dead_letter_in_batch(rt, _record(b"\x7fbad"))


async def test_a_letter_the_broker_refuses_is_sent_again_without_the_original(
    rt: Runtime,
) -> None:
    # e.g. the dead-letter topic's max.message.bytes is below the producer's limit
    _producer(rt).refusals.append(MessageSizeTooLargeError("MESSAGE_TOO_LARGE"))
    original = b"\x7f" + b"x" * 20_000
    await _dead_letter_in_batch(rt, _record(original))  # the acknowledgements succeed
    first, second = _letters(rt)
    assert first.original_value == original
    assert second.original_value is None
    assert second.original_key is None
    assert "the broker refused the dead letter (MessageSizeTooLargeError)" in second.reason
    assert f"the original value was {len(original)} bytes" in second.reason
    assert hashlib.sha256(original).hexdigest() in second.reason
    assert second.reason.startswith("first byte 0x7f")
    assert (second.source_partition, second.source_offset) == (2, 41)


async def test_a_letter_refused_twice_is_logged_and_the_batch_goes_on(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    _producer(rt).refusals.extend(
        [MessageSizeTooLargeError("too large"), RecordListTooLargeError("still too large")]
    )
    before = _errors("test.decode.deadletter", "RecordListTooLargeError")
    with caplog.at_level(logging.ERROR, logger="streams.agents.common"):
        await _dead_letter_in_batch(rt, _record(b"\x7fbad"))
    assert len(_producer(rt).sent) == 2
    assert _errors("test.decode.deadletter", "RecordListTooLargeError") == before + 1
    assert "could not dead-letter t.inbound[2]@41" in caplog.text


async def test_a_transient_acknowledgement_failure_fails_the_batch(rt: Runtime) -> None:
    _producer(rt).refusals.append(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await _dead_letter_in_batch(rt, _record(b"\x7fbad"))
    assert len(_producer(rt).sent) == 1  # not sent again: the worker replays the batch


async def test_the_worker_producer_states_the_limit_aiokafka_enforces() -> None:
    producer = Producer(Settings(kafka_brokers="127.0.0.1:9"))
    try:
        assert producer.max_request_size == 8 * 1024 * 1024
        assert producer._producer._max_request_size == producer.max_request_size
    finally:
        await producer.stop()


async def test_an_unreadable_record_is_dead_lettered_as_a_placeholder(rt: Runtime) -> None:
    # BatchConsumer.on_unreadable, wired by the worker: a record the client cannot parse (a
    # header key that is not UTF-8) has no key, value or headers to keep, only where it is.
    with handling(BatchContext()):
        await dead_letter_unreadable(
            rt,
            TOPIC,
            "ingest",
            "t.inbound",
            3,
            17,
            "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0",
        )
    (sent,) = _producer(rt).sent
    letter = rt.codec.decode(sent.value, DeadLetter)
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "t.inbound",
        3,
        17,
    )
    assert (letter.stage, letter.error_type) == ("ingest.fetch", "UnreadableRecord")
    assert letter.reason.startswith("the Kafka client cannot read this record: UnicodeDecode")
    assert (letter.original_key, letter.original_value, letter.original_headers) == (None, None, [])
