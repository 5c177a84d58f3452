"""Reading a topic from its beginning in tests, to find the record a test expects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import Codec
from schemas.models import AvroRecord
from streams.stack import EmbeddedStack

__all__ = ["find_record"]

R = TypeVar("R", bound=AvroRecord)


async def find_record(
    stack: EmbeddedStack,
    topic: str,
    model: type[R],
    match: Callable[[R], bool],
    *,
    wait_s: float = 30.0,
) -> R:
    """The first record of ``topic`` (all partitions, from the beginning) that ``match`` accepts.

    Raises:
        AssertionError: none arrived within ``wait_s`` seconds.
    """
    codec = Codec()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.settings().broker_list(), group_id=None, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(stack.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    decoded = codec.decode(record.value, model)
                    if match(decoded):
                        return decoded
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    raise AssertionError(f"no matching {model.__name__} on {topic} within {wait_s} s")
