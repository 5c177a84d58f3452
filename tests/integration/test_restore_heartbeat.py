"""A table restore longer than the session timeout, against the real broker: the member stays
in its group.

aiokafka stops the group's heartbeat for the rejoin and restarts it only once the assignment
callback returned. The restore used to run inside that callback: one longer than the session
timeout got the member evicted, and a second rebalance (and restore) followed. Now it runs
beside the stage with the partitions paused; heartbeats go on.

Here a second member of the group joins one that keeps heartbeating (a member alone in its
group was not evicted by Tansu, whatever its silence: measured), and its ``on_assigned`` hook
waits well past the session timeout before it restores a real ``ChangelogTable``. The records
sent meanwhile must be handled once each — the slow member's only after its restore, against
the restored state — with no second assignment and the same group generation throughout.

The test starts a broker of its own (Tansu, memory storage) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from support.waiting import until

from streams.embedded import ManagedProcess
from streams.settings import Settings
from streams.table import ChangelogTable
from streams.topics import create_topics
from streams.transport import BatchConsumer, BatchContext, Producer, handling

pytestmark = pytest.mark.integration

SESSION_S = 2.0
"""The stage's session timeout (s); Tansu waits half of it in every JoinGroup round."""
SLOW_S = 2.5 * SESSION_S
"""How long the hook waits before it restores (s): the member would be evicted twice over."""
WATCH_S = 2 * SESSION_S
"""How long the group is watched after every record was handled (s): an eviction during the
restore would show as a second assignment within it."""
RECORDS = 10


class Member:
    """A stage of the group ``<app_id>.slowrestore`` that notes what it handles."""

    def __init__(self, settings: Settings, table: ChangelogTable[str] | None) -> None:
        self.table = table
        self.handled: list[tuple[int, int, float, str | None]] = []
        """(partition, offset, when (monotonic s), the table's state of the partition)."""
        self.stage = BatchConsumer(
            settings, "slowrestore", [settings.topics.conversations], self.handle
        )
        self.run: asyncio.Future[None] | None = None

    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        now = time.monotonic()
        for r in records:
            state = None if self.table is None else self.table.get(r.partition, b"state")
            self.handled.append((r.partition, r.offset, now, state))

    async def start(self) -> None:
        await self.stage.start()
        self.run = asyncio.ensure_future(self.stage.run())

    async def stop(self) -> None:
        self.stage.stop_soon()
        if self.run is not None:
            await asyncio.wait_for(self.run, 10)
        await self.stage.close()

    def generation(self) -> int:
        return int(self.stage.consumer._coordinator.generation)


async def _slow_restore_scenario(settings: Settings) -> dict[str, Any]:
    """Member ``other`` owns both partitions; member ``slow`` joins, and its hook waits
    ``SLOW_S`` before it restores its table partition. Only then are the records sent."""
    await create_topics(settings)
    producer = Producer(settings)
    await producer.start()
    changelog = f"{settings.app_id}-conversations-changelog"
    try:
        writer: ChangelogTable[str] = ChangelogTable(
            settings, producer, changelog, encode=str.encode, decode=bytes.decode
        )
        await writer.restore({0, 1})
        with handling(BatchContext()) as ctx:
            writer.put_many([(p, b"state", f"p{p}") for p in (0, 1)])
        for action in ctx.after:
            await action()
        await producer.flush()

        table: ChangelogTable[str] = ChangelogTable(
            settings, producer, changelog, encode=str.encode, decode=bytes.decode
        )
        other = Member(settings, None)
        slow = Member(settings, table)
        hooks: list[set[int]] = []
        restored: list[float] = []

        async def assigned(tps: set[TopicPartition]) -> None:
            hooks.append({tp.partition for tp in tps})
            await asyncio.sleep(SLOW_S)  # a restore slowed down past the session timeout
            await table.restore({tp.partition for tp in tps})
            restored.append(time.monotonic())

        slow.stage.on_assigned = assigned
        await other.start()
        try:
            await until(lambda: len(other.stage.assigned) == 2, 15)
            assert len(other.stage.assigned) == 2, "the first member got no partitions"
            await slow.start()
            try:
                await until(lambda: bool(hooks), 15)
                assert hooks, "the second member was never assigned partitions"
                generation = slow.generation()
                for n in range(RECORDS):  # sent while the slow member restores
                    await producer.send(settings.topics.conversations, b"r", partition=n % 2)
                await producer.flush()
                await until(lambda: len(other.handled) + len(slow.handled) >= RECORDS, SLOW_S + 15)
                await asyncio.sleep(WATCH_S)
                generations = (generation, slow.generation())
            finally:
                await slow.stop()
        finally:
            await other.stop()
        return {
            "hooks": hooks,
            "restored": restored,
            "slow": slow.handled,
            "other": other.handled,
            "generations": generations,
        }
    finally:
        await producer.stop()


async def _unused(records: list[ConsumerRecord[bytes, bytes]]) -> None:
    raise AssertionError("replaced before the stage starts")


def test_a_restore_longer_than_the_session_timeout_keeps_the_member_in_its_group(
    broker: ManagedProcess,
) -> None:
    unique = f"slowrestore-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_brokers=broker.address,
        topic_prefix=unique,
        app_id=unique,
        partitions=2,
        fetch_max_wait_ms=50,
        session_timeout_s=SESSION_S,
    )
    result = asyncio.run(_slow_restore_scenario(settings))
    hooks, restored, slow, other = (result[k] for k in ("hooks", "restored", "slow", "other"))
    assert len(hooks) == 1, f"the slow member was assigned {len(hooks)} times: {hooks}"
    assert len(restored) == 1
    generation, still = result["generations"]
    assert generation == still, "the group rebalanced: the slow member was evicted"
    (mine,) = hooks
    assert len(mine) == 1, f"the slow member holds partitions {mine}"
    handled = sorted((p, o) for p, o, _, _ in slow + other)
    assert handled == sorted((n % 2, n // 2) for n in range(RECORDS))  # each once
    assert {p for p, _, _, _ in slow} == mine
    assert all(at >= restored[0] for _, _, at, _ in slow)  # none before the restore
    assert all(state == f"p{p}" for p, _, _, state in slow)  # against the restored state
