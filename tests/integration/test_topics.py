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
