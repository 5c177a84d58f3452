"""The changelog table against the real broker: changes written in batches, restored exactly."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from streams.settings import Settings
from streams.stack import EmbeddedStack
from streams.table import ChangelogTable
from streams.topics import create_topics
from streams.transport import BatchContext, Producer, handling

pytestmark = pytest.mark.integration


def _table(settings: Settings, producer: Producer) -> ChangelogTable[str]:
    return ChangelogTable(
        settings,
        producer,
        f"{settings.app_id}-conversations-changelog",
        encode=str.encode,
        decode=bytes.decode,
    )


async def _write_and_restore(settings: Settings) -> tuple[dict[bytes, str], int]:
    await create_topics(settings)
    producer = Producer(settings)
    await producer.start()
    try:
        writer = _table(settings, producer)
        await writer.restore({0, 1})
        # 3 rounds of 400 keys each, batched like a stage's batch: the later round wins.
        for round_ in range(3):
            with handling(BatchContext()) as ctx:
                writer.put_many([(k % 2, f"k{k}".encode(), f"v{round_}-{k}") for k in range(400)])
            for action in ctx.after:
                await action()
        await producer.flush()
        reader = _table(settings, producer)
        read = await reader.restore({0, 1})
        return {key: value for _, key, value in reader.items()}, read
    finally:
        await producer.stop()


def test_restore_reads_up_to_its_marker_and_the_last_write_of_each_key_wins(
    stack: EmbeddedStack,
) -> None:
    prefix = f"table-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_brokers=stack.settings().kafka_brokers,
        topic_prefix=prefix,
        app_id=prefix,
        partitions=2,
        fetch_max_wait_ms=50,
    )
    restored, read = asyncio.run(_write_and_restore(settings))
    assert len(restored) == 400
    assert all(restored[f"k{k}".encode()] == f"v2-{k}" for k in range(400))
    assert read >= 1200  # every change record was read, markers aside
