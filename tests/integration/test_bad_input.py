"""Bad records published by an independent client (librdkafka) land on the dead-letter topic."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer
from support.stacks import running_stack

from processors.ids import new_message_id
from schemas.codec import Codec
from schemas.models import DeadLetter, DeliveryReport, InboundMessage, utcnow
from streams.replay import assign_from_end
from streams.stack import EmbeddedStack
from streams.transport import Producer as WorkerProducer

pytestmark = pytest.mark.integration


def _valid(content: str) -> InboundMessage:
    now = utcnow()
    return InboundMessage(
        message_id=new_message_id(now),
        tenant="bad-input",
        channel="chat",
        sender=f"user-{content[:8]}@example.com",
        content=content,
        created_at=now,
    )


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def test_each_bad_record_is_dead_lettered_with_reason_and_bytes_and_neighbours_flow(
    stack: EmbeddedStack,
) -> None:
    settings = stack.settings()
    codec = Codec()
    good_before, good_after = _valid("Hello there"), _valid("Good morning")
    avro = codec.encode(_valid("How are you?"))
    now_ms = int(time.time() * 1000)
    bad: dict[str, tuple[bytes, str]] = {
        # name: (bytes, fragment the reason must contain)
        "garbage": (b"\x7f\x00garbage\xff", "first byte"),
        "truncated_avro": (avro[: len(avro) // 2], "truncated"),
        "wrong_magic": (b"\xc3\x02" + avro[2:], "magic"),
        "json_missing_fields": (_json(tenant="t", channel="chat"), "Field required"),
        "json_wrong_types": (
            _json(
                message_id=1,
                tenant="t",
                channel="pigeon",
                sender="s",
                content="hi",
                created_at=now_ms,
            ),
            "channel",
        ),
        "one_megabyte_body": (
            _json(
                message_id=new_message_id(utcnow()),
                tenant="t",
                channel="chat",
                sender="s",
                content="x" * 1_000_000,
                created_at=now_ms,
            ),
            "limit is 4000",
        ),
        "invalid_utf8": (b'{"content": "\xff\xfe"}', "UTF-8"),
        "empty": (b"", "empty"),
    }
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker_list(),
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await assign_from_end(
            consumer, [settings.topics.deadletter, settings.topics.delivery_reports]
        )
        producer = Producer(
            {"bootstrap.servers": settings.kafka_brokers, "message.max.bytes": 4 * 1024 * 1024}
        )
        producer.produce(settings.topics.inbound, codec.encode(good_before), key=b"k1")
        for value, _ in bad.values():
            producer.produce(settings.topics.inbound, value, key=b"bad")
        producer.produce(
            settings.topics.inbound, _json(**json.loads(good_after.model_dump_json())), key=b"k2"
        )
        assert producer.flush(30) == 0

        wanted_reports = {good_before.message_id, good_after.message_id}
        dead: list[DeadLetter] = []
        reports: dict[str, DeliveryReport] = {}
        originals = {value for value, _ in bad.values()}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (
            len(dead) < len(bad) or set(reports) != wanted_reports
        ):
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    if record.topic == settings.topics.deadletter:
                        letter = codec.decode(record.value, DeadLetter)
                        if letter.original_value in originals:
                            dead.append(letter)
                    else:
                        report = codec.decode(record.value, DeliveryReport)
                        if report.message_id in wanted_reports:
                            reports[report.message_id] = report
            await asyncio.sleep(0)
    finally:
        await consumer.stop()

    stack.check_workers()
    by_value = {letter.original_value: letter for letter in dead}
    for name, (value, fragment) in bad.items():
        letter = by_value.get(value)
        assert letter is not None, f"{name} was not dead-lettered"
        assert fragment.lower() in letter.reason.lower(), (name, letter.reason)
        assert letter.stage.startswith("ingest."), (name, letter.stage)
        assert letter.source_topic == settings.topics.inbound
        assert letter.source_offset >= 0
    assert len(dead) == len(bad)
    assert set(reports) == wanted_reports
    assert all(r.status.value == "delivered" for r in reports.values())


@pytest.fixture(scope="module")
def own_stack(
    tmp_path_factory: pytest.TempPathFactory, pipeline_config: Path
) -> Iterator[EmbeddedStack]:
    """A stack of its own: before the fix, the record below made its worker exit."""
    yield from running_stack(tmp_path_factory.mktemp("big-dead-letter"), "bigdl", pipeline_config)


async def test_record_whose_dead_letter_exceeds_the_producer_limit_is_cut_and_the_stage_goes_on(
    own_stack: EmbeddedStack,
) -> None:
    settings = own_stack.settings()
    codec = Codec()
    producer = WorkerProducer(settings)  # what the worker's producer is built with
    limit = producer.max_request_size
    await producer.stop()
    # Undecodable, and just under the limit itself: its letter (the value plus the letter's
    # fields and the record overhead) is over it.
    original = b"\x7f" + b"\xab" * (limit - 200)
    good = _valid("Still there?")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker_list(),
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=limit,
    )
    await consumer.start()
    try:
        await assign_from_end(
            consumer, [settings.topics.deadletter, settings.topics.delivery_reports]
        )
        client = Producer(
            {"bootstrap.servers": settings.kafka_brokers, "message.max.bytes": 2 * limit}
        )
        # One key: both records in the same partition, the good one after the big one.
        client.produce(settings.topics.inbound, original, key=b"big")
        client.produce(settings.topics.inbound, codec.encode(good), key=b"big")
        assert client.flush(30) == 0

        letter: DeadLetter | None = None
        report: DeliveryReport | None = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (letter is None or report is None):
            own_stack.check_workers()  # before the fix: exited with status 70
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    if record.topic == settings.topics.deadletter:
                        found = codec.decode(record.value, DeadLetter)
                        if found.stage == "ingest.decode":
                            letter = found
                    else:
                        found_report = codec.decode(record.value, DeliveryReport)
                        if found_report.message_id == good.message_id:
                            report = found_report
    finally:
        await consumer.stop()

    own_stack.check_workers()
    assert letter is not None, "the big record was not dead-lettered"
    assert letter.original_value is not None
    assert 0 < len(letter.original_value) < len(original)
    assert original.startswith(letter.original_value)
    assert f"of {len(original)} bytes" in letter.reason
    assert hashlib.sha256(original).hexdigest() in letter.reason
    assert "first byte" in letter.reason
    assert letter.source_topic == settings.topics.inbound
    assert letter.source_offset >= 0
    assert letter.original_key == b"big"
    assert report is not None, "the record after the big one was not delivered"
    assert report.status.value == "delivered"
