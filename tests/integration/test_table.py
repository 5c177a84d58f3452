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


def _fresh_settings(stack: EmbeddedStack) -> Settings:
    """Settings of a new app id and topic prefix (2 partitions) on the session's broker."""
    prefix = f"table-{uuid.uuid4().hex[:8]}"
    return Settings(
        kafka_brokers=stack.settings().kafka_brokers,
        topic_prefix=prefix,
        app_id=prefix,
        partitions=2,
        fetch_max_wait_ms=50,
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
        decoded: list[bytes] = []

        def decode(data: bytes) -> str:
            decoded.append(data)
            return data.decode()

        reader.decode = decode
        read = await reader.restore({0, 1})
        # each key decoded once, from its last write (before: 1,200 decodes, one per write)
        assert sorted(decoded) == sorted(f"v2-{k}".encode() for k in range(400))
        return {key: value for _, key, value in reader.items()}, read
    finally:
        await producer.stop()


def test_restore_reads_up_to_its_marker_and_the_last_write_of_each_key_wins(
    stack: EmbeddedStack,
) -> None:
    settings = _fresh_settings(stack)
    restored, read = asyncio.run(_write_and_restore(settings))
    assert len(restored) == 400
    assert all(restored[f"k{k}".encode()] == f"v2-{k}" for k in range(400))
    assert read >= 1200  # every change record was read, markers aside


async def _away_and_back(settings: Settings) -> tuple[str | None, str | None, int]:
    await create_topics(settings)
    producer = Producer(settings)
    await producer.start()

    async def write(table: ChangelogTable[str], value: str) -> None:
        with handling(BatchContext()) as ctx:
            table.put_many([(0, b"k", value), (1, b"other", value)])
        for action in ctx.after:
            await action()
        await producer.flush()

    try:
        first = _table(settings, producer)
        await first.restore({0, 1})
        await write(first, "from-first")
        # The first worker misses a round of the group: the second one restores the partitions
        # and changes them; then the first gets them back without having dropped them.
        second = _table(settings, producer)
        await second.restore({0, 1})
        await write(second, "from-second")
        # The first one, not yet aware, writes a key of its own: its position must not jump
        # past the second one's changes.
        with handling(BatchContext()) as ctx:
            first.put_many([(0, b"mine", "late")])
        for action in ctx.after:
            await action()
        await producer.flush()
        caught_up = await first.restore({0, 1})
        return first.get(0, b"k"), first.get(1, b"other"), caught_up
    finally:
        await producer.stop()


def test_partitions_kept_across_a_rebalance_catch_up_with_changes_made_elsewhere(
    stack: EmbeddedStack,
) -> None:
    settings = _fresh_settings(stack)
    k, other, read = asyncio.run(_away_and_back(settings))
    assert (k, other) == ("from-second", "from-second")
    # the other worker's two changes and the late one, not the whole changelog again
    assert read == 3


async def _delete_and_restore(
    settings: Settings,
) -> tuple[dict[bytes, str], dict[bytes, str], str | None, int, int]:
    await create_topics(settings)
    producer = Producer(settings)
    await producer.start()

    async def batch(
        table: ChangelogTable[str], changes: list[tuple[int, bytes, str | None]]
    ) -> None:
        with handling(BatchContext()) as ctx:
            table.put_many(changes)
        for action in ctx.after:
            await action()
        await producer.flush()

    try:
        writer = _table(settings, producer)
        await writer.restore({0, 1})
        await batch(writer, [(k % 2, f"k{k}".encode(), f"v{k}") for k in range(10)])
        # another worker's copy that holds every key; it catches up after the deletes
        kept = _table(settings, producer)
        await kept.restore({0, 1})
        # a batch deleting 3 keys (tombstones) and changing another, one of them on each side
        await batch(
            writer, [(0, b"k0", None), (1, b"k1", None), (0, b"k2", "again"), (1, b"k3", None)]
        )
        gone_at_once = writer.get(0, b"k0")
        fresh = _table(settings, producer)
        read = await fresh.restore({0, 1})
        caught_up = await kept.restore({0, 1})
        return (
            {key: value for _, key, value in fresh.items()},
            {key: value for _, key, value in kept.items()},
            gone_at_once,
            read,
            caught_up,
        )
    finally:
        await producer.stop()


def test_deleted_keys_are_tombstoned_and_absent_after_restore_and_catch_up(
    stack: EmbeddedStack,
) -> None:
    settings = _fresh_settings(stack)
    restored, kept, gone_at_once, read, caught_up = asyncio.run(_delete_and_restore(settings))
    expected = {f"k{k}".encode(): f"v{k}" for k in range(4, 10)} | {b"k2": "again"}
    assert gone_at_once is None  # the writer's own copy forgets at once
    assert restored == expected  # a fresh table restored from the changelog
    assert kept == expected  # a held copy caught up with the tombstones
    assert read == 10 + 4  # the 3 tombstones are change records, read like the others
    assert caught_up == 4
