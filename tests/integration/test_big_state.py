"""An input whose conversation state would not fit in a changelog record, on a real worker.

The reviewer's record: a user turn with 1.5 MB of control characters in its metadata, 9 MB
once the state is written as JSON (``\\u0001`` per character), over the producer's 8 MiB
``max_request_size``. It is published straight to the conversations topic, as a client with
access to it could, past ingest's limits. Before the conversation stage checked the size of
new states, its LLM request went out, the changelog write failed after the batch's
acknowledgements and the worker exited with status 70, again on every restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer
from support.stacks import running_stack

from processors.preprocess import conversation_key
from schemas.codec import Codec
from schemas.models import ConversationEvent, DeadLetter, DeliveryReport, utcnow
from streams.replay import assign_from_end
from streams.stack import EmbeddedStack
from streams.transport import MAX_REQUEST_SIZE

pytestmark = pytest.mark.integration
TENANT = "big-state"


@pytest.fixture(scope="module")
def big_state_stack(
    tmp_path_factory: pytest.TempPathFactory, pipeline_config: Path
) -> Iterator[EmbeddedStack]:
    """A stack of its own: before the fix, the record below made its worker exit."""
    yield from running_stack(tmp_path_factory.mktemp("big-state"), "bigstate", pipeline_config)


def _turn(conversation: str, content: str, **metadata: str) -> ConversationEvent:
    now = utcnow()
    return ConversationEvent(
        event_id=f"{conversation}-{uuid.uuid4().hex[:8]}",
        conversation_id=conversation,
        tenant=TENANT,
        content=content,
        sender=f"{conversation}@big-state.test",
        metadata=metadata,
        origin_created_at=now,
        created_at=now,
    )


async def test_turn_too_large_for_the_changelog_is_dead_lettered_and_the_worker_goes_on(
    big_state_stack: EmbeddedStack,
) -> None:
    stack = big_state_stack
    settings = stack.settings()
    codec = Codec()
    conversation = f"big-{uuid.uuid4().hex[:6]}"
    key = conversation_key(TENANT, conversation).encode()
    big = _turn(conversation, "hi", x="\x01" * 1_500_000)
    normal = _turn(conversation, "My mouse is not responding.")
    big_value = codec.encode(big)
    assert len(big_value) < 2_000_000
    assert len(big.model_dump_json()) > MAX_REQUEST_SIZE  # and so is the state it would make

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker_list(),
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_REQUEST_SIZE,
    )
    await consumer.start()
    letter: DeadLetter | None = None
    report: DeliveryReport | None = None
    try:
        await assign_from_end(
            consumer, [settings.topics.deadletter, settings.topics.delivery_reports]
        )
        client = Producer(
            {
                "bootstrap.servers": settings.kafka_brokers,
                "message.max.bytes": 4 * 1024 * 1024,
                "partitioner": "murmur2_random",  # the Java client's, as the worker's producer
            }
        )
        # One key, so one partition: the normal turn comes after the big one.
        client.produce(settings.topics.conversations, big_value, key=key)
        client.produce(settings.topics.conversations, codec.encode(normal), key=key)
        assert client.flush(30) == 0

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (letter is None or report is None):
            stack.check_workers()  # before the fix: exited with status 70
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    if record.topic == settings.topics.deadletter:
                        found = codec.decode(record.value, DeadLetter)
                        if found.original_key == key:
                            letter = found
                    else:
                        found_report = codec.decode(record.value, DeliveryReport)
                        if found_report.message_id == normal.event_id:
                            report = found_report
            await asyncio.sleep(0)
    finally:
        await consumer.stop()

    stack.check_workers()
    assert letter is not None, "the big turn was not dead-lettered"
    assert letter.stage == "conversation.state"
    assert letter.error_type == "StateTooLarge"
    assert letter.message_id == big.event_id
    assert letter.tenant == TENANT
    assert letter.original_value == big_value
    assert "new state would be" in letter.reason
    assert f"over the limit of {MAX_REQUEST_SIZE - len(key) - 1024} bytes" in letter.reason
    assert report is not None, "the turn after the big one was not answered"
    assert report.status.value == "delivered"
    assert report.conversation_id == conversation
