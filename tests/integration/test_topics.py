"""Topic creation: every topic once, and a clear error when existing counts do not match."""

from __future__ import annotations

import asyncio
import uuid

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
