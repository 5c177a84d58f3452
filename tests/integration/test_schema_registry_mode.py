"""Workers in Schema Registry mode, against a Confluent-compatible registry on loopback.

The workers register every bundled schema at start-up and write the Confluent framing on every
topic; a stage other than ingest reads a record written with a newer writer schema (as a
producer upgraded before the workers would write it) by fetching that schema from the
registry; a record whose schema id the registry does not know is dead-lettered and the
records after it still flow.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastavro import parse_schema, schemaless_writer
from support.schema_registry import LoopbackRegistry, RegistryThread
from support.stacks import new_stack

from processors.ids import new_message_id
from processors.preprocess import conversation_key
from schemas import registry as bundled
from schemas.codec import Codec
from schemas.models import ConversationEvent, DeadLetter, DeliveryReport, utcnow
from schemas.schema_registry_client import SchemaRegistryClient
from streams.replay import assign_from_end, replay
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration

TENANT = "registry-mode"


@pytest.fixture(scope="module")
def registry_stack(
    tmp_path_factory: pytest.TempPathFactory, pipeline_config: Path
) -> Iterator[tuple[EmbeddedStack, LoopbackRegistry]]:
    with RegistryThread() as server:
        stack = new_stack(tmp_path_factory.mktemp("registry-mode"), "srmode")
        stack.config = pipeline_config
        stack.schema_registry_url = server.url
        with stack:  # started here, stopped on exit
            stack.wait_ready()
            yield stack, server.registry


def _schema_id(registry: LoopbackRegistry, short_name: str) -> int:
    ids = registry.subjects[f"switchboard.{short_name}"]
    assert len(set(ids)) == 1, ids  # every registration of the bundled schema got one id
    return ids[0]


def _turn(conversation_id: str, content: str) -> ConversationEvent:
    now = utcnow()
    return ConversationEvent(
        event_id=new_message_id(now),
        conversation_id=conversation_id,
        tenant=TENANT,
        persona="concierge",
        content=content,
        sender=f"{conversation_id}@example.com",
        origin_created_at=now,
        created_at=now,
    )


async def _publish_and_collect(
    stack: EmbeddedStack,
    records: list[tuple[bytes, bytes]],
    *,
    reports_for: set[str],
    letters: int,
    codec: Codec,
) -> tuple[dict[str, DeliveryReport], list[DeadLetter]]:
    """Publish ``(key, value)`` records to the conversations topic; read delivery reports of
    the conversations ``reports_for`` and dead letters of tenant ``TENANT`` (or of a value
    published here) until all reports and ``letters`` letters arrived (90 s at most)."""
    settings = stack.settings()
    topics = settings.topics
    published = {value for _, value in records}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker_list(), group_id=None, enable_auto_commit=False
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker_list(), acks="all")
    reports: dict[str, DeliveryReport] = {}
    dead: list[DeadLetter] = []
    await consumer.start()
    await producer.start()
    try:
        await assign_from_end(consumer, [topics.delivery_reports, topics.deadletter])
        for key, value in records:
            await producer.send_and_wait(topics.conversations, value, key=key)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (set(reports) != reports_for or len(dead) < letters):
            stack.check_workers()
            batch = await consumer.getmany(timeout_ms=300)
            for tp_records in batch.values():
                for record in tp_records:
                    if record.topic == topics.deadletter:
                        letter = codec.decode(record.value, DeadLetter)
                        if letter.original_value in published:
                            dead.append(letter)
                        continue
                    report = codec.decode(record.value, DeliveryReport)
                    if report.conversation_id in reports_for:
                        reports[report.conversation_id] = report
            await asyncio.sleep(0)
    finally:
        await producer.stop()
        await consumer.stop()
    return reports, dead


async def test_workers_register_every_schema_and_write_the_confluent_framing(
    registry_stack: tuple[EmbeddedStack, LoopbackRegistry],
) -> None:
    stack, registry = registry_stack
    assert set(registry.subjects) == set(bundled.schema_names())
    lines = [
        {
            "tenant": TENANT,
            "channel": "chat",
            "sender": f"framing-{c}@example.com",
            "content": f"Hello, question {c}?",
            "conversation_id": f"framing-{c}-{uuid.uuid4().hex[:6]}",
        }
        for c in range(4)
    ]
    result = await replay(stack.settings(), lines, timeout_s=60)
    summary = result.summary()
    assert summary["replies_delivered"] == len(lines), summary
    assert summary["dead_lettered"] == 0, summary

    async def first_bytes(topic: str) -> set[bytes]:
        settings = stack.settings()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.broker_list(), group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(stack.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            heads: set[bytes] = set()
            for _ in range(10):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    heads.update(bytes(r.value[:5]) for r in records if r.value)
            return heads
        finally:
            await consumer.stop()

    topics = stack.settings().topics
    for topic, name in [
        (topics.conversations, "ConversationEvent"),
        (topics.llm_requests, "LLMRequest"),
        (topics.delivery_requests, "DeliveryRequest"),
        (topics.delivery_reports, "DeliveryReport"),
    ]:
        framing = b"\x00" + _schema_id(registry, name).to_bytes(4, "big")
        assert await first_bytes(topic) == {framing}, topic


async def test_a_newer_writer_schema_is_fetched_by_the_conversation_stage_and_read(
    registry_stack: tuple[EmbeddedStack, LoopbackRegistry],
) -> None:
    """A producer upgraded before the workers writes ConversationEvent v2 (one more field,
    with a default) straight to the conversations topic: the conversation stage, not only
    ingest, must fetch the writer schema by id and resolve it to the schema it was built with.
    Before the fetch was wired into every stage, this turn was dead-lettered."""
    stack, registry = registry_stack
    evolved = bundled.raw_schema("ConversationEvent")
    evolved["fields"].append({"name": "mood", "type": "string", "default": "calm"})
    conversation = f"evolved-{uuid.uuid4().hex[:8]}"
    event = _turn(conversation, "Hi, can I book a table for two tonight?")

    bundled_id = _schema_id(registry, "ConversationEvent")
    async with SchemaRegistryClient(stack.schema_registry_url or "") as client:
        new_id = await client.register("switchboard.ConversationEvent", json.dumps(evolved))
    assert new_id != bundled_id
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(evolved), {**event.to_avro(), "mood": "curious"})
    value = b"\x00" + new_id.to_bytes(4, "big") + body.getvalue()
    key = conversation_key(TENANT, conversation).encode()

    codec = Codec(SchemaRegistryClient(stack.schema_registry_url or ""))
    await codec.start()
    try:
        reports, dead = await _publish_and_collect(
            stack, [(key, value)], reports_for={conversation}, letters=0, codec=codec
        )
    finally:
        await codec.aclose()
    assert dead == [], [letter.reason for letter in dead]
    assert conversation in reports, "the turn written with the newer schema got no reply"
    assert reports[conversation].status.value == "delivered"
    assert new_id in registry.fetched


async def test_an_unknown_schema_id_is_dead_lettered_once_asked_and_the_partition_goes_on(
    registry_stack: tuple[EmbeddedStack, LoopbackRegistry],
) -> None:
    stack, registry = registry_stack
    unknown = 987_654
    conversation = f"unknown-id-{uuid.uuid4().hex[:8]}"
    key = conversation_key(TENANT, conversation).encode()
    codec = Codec(SchemaRegistryClient(stack.schema_registry_url or ""))
    await codec.start()
    try:
        good = codec.encode(_turn(conversation, "Are you open on Sundays?"))
        bad = [b"\x00" + unknown.to_bytes(4, "big") + bytes([2 * n + 2]) + b"x" for n in range(3)]
        # One key: the bad records, then the good one, in the same partition in this order.
        records = [(key, value) for value in bad] + [(key, good)]
        reports, dead = await _publish_and_collect(
            stack, records, reports_for={conversation}, letters=len(bad), codec=codec
        )
    finally:
        await codec.aclose()
    assert sorted(letter.original_value or b"" for letter in dead) == sorted(bad)
    for letter in dead:
        assert letter.stage == "conversation.decode", letter
        assert f"schema id {unknown} unknown to the schema registry" in letter.reason
        assert letter.source_topic == stack.settings().topics.conversations
    assert registry.fetched.count(unknown) == 1  # the registry's answer is remembered
    assert conversation in reports, "the record after the unknown ids was not answered"
    assert reports[conversation].status.value == "delivered"
