"""Topic creation: every topic once, and a clear error when existing counts do not match."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from streams.settings import Settings
from streams.stack import EmbeddedStack
from streams.topics import TopicLayoutError, create_topics

pytestmark = pytest.mark.integration


def test_topics_are_created_once_and_a_partition_mismatch_is_refused(
    stack: EmbeddedStack,
) -> None:
    prefix = f"topics-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_brokers=stack.settings().kafka_brokers,
        topic_prefix=prefix,
        app_id=prefix,
        partitions=3,
    )
    created = asyncio.run(create_topics(settings))
    assert set(settings.topics.all()) <= set(created)
    assert f"{prefix}-conversations-changelog" in created
    assert asyncio.run(create_topics(settings)) == []
    wider = settings.model_copy(update={"partitions": 6})
    with pytest.raises(TopicLayoutError, match=rf"{prefix}\.inbound has 3 partitions, expected 6"):
        asyncio.run(create_topics(wider))


class _Response:
    def __init__(self, *topic_errors: tuple[Any, ...]) -> None:
        self.topic_errors = list(topic_errors)


def test_a_topic_the_broker_refuses_is_an_error_and_one_that_exists_is_not_created() -> None:
    from streams.topics import _created

    assert _created(_Response(("t", 0, None)), "t") is True
    assert _created(_Response(("t", 36, "exists")), "t") is False
    with pytest.raises(TopicLayoutError, match=r"PolicyViolationError max\.message\.bytes too big"):
        _created(_Response(("t", 44, "max.message.bytes too big")), "t")


async def _limits_scenario(settings: Settings) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import MessageSizeTooLargeError

    from streams.topics import internal_topics, record_limits
    from streams.transport import MAX_REQUEST_SIZE, Producer

    changelog = internal_topics(settings)[0][0]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker_list())
    await admin.start()
    try:  # as a platform team would have created them, before the first worker
        await admin.create_topics(
            [
                NewTopic(
                    settings.topics.deadletter, 4, 1, topic_configs={"max.message.bytes": "20000"}
                ),
                NewTopic(
                    changelog,
                    4,
                    1,
                    topic_configs={"max.message.bytes": "50000", "cleanup.policy": "compact"},
                ),
            ]
        )
    finally:
        await admin.close()
    await create_topics(settings)
    limits = await record_limits(settings, [*settings.topics.all(), changelog])
    producer = Producer(settings, record_limits=limits)
    await producer.start()
    try:
        small = await (await producer.send(settings.topics.deadletter, b"x" * 1000, key=b"k"))
        with pytest.raises(
            MessageSizeTooLargeError,
            match=rf"max\.message\.bytes of {settings.topics.deadletter} \(20000 bytes\)",
        ):
            await producer.send(settings.topics.deadletter, b"x" * 20_000, key=b"k")
        other = await (await producer.send(settings.topics.inbound, b"x" * 60_000, key=b"k"))
    finally:
        await producer.stop()
    return {
        "limits": limits,
        "kept": producer.record_limits,
        "batch": producer._producer._message_accumulator._batch_size,
        "offsets": (small.offset, other.offset),
        "max": MAX_REQUEST_SIZE,
        "changelog": changelog,
    }


def test_the_producer_keeps_to_the_max_message_bytes_of_topics_created_elsewhere(
    stack: EmbeddedStack,
) -> None:
    prefix = f"limits-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_brokers=stack.settings().kafka_brokers, topic_prefix=prefix, app_id=prefix
    )
    result = asyncio.run(_limits_scenario(settings))
    limits, changelog = result["limits"], result["changelog"]
    assert limits[settings.topics.deadletter] == 20_000
    assert limits[changelog] == 50_000
    assert limits[settings.topics.inbound] == result["max"]  # ours, created with 8 MiB
    assert result["kept"] == {settings.topics.deadletter: 20_000, changelog: 50_000}
    assert result["batch"] == 20_000  # a batch never exceeds the smallest topic limit
    assert result["offsets"] == (0, 0)  # the record under the limit, and the other topic's


def test_a_broker_that_cannot_be_asked_leaves_the_limits_unknown() -> None:
    from streams.embedded import find_free_port
    from streams.topics import record_limits

    settings = Settings(kafka_brokers=f"127.0.0.1:{find_free_port()}")
    assert asyncio.run(record_limits(settings, ["t"], timeout_s=1.0)) == {}
