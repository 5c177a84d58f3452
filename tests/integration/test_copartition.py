"""Co-partitioned assignment against the real broker: one worker, the same partition numbers in
every stage's group, and a rolling upgrade from the range-only release still forms a group.

Two "workers" (a worker id each) join three consumer groups, one per stage, in a different
order in each group so that the coordinator's member ids sort differently. The test starts a
broker of its own (Tansu, memory storage) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from support.waiting import until

from streams.embedded import ManagedProcess
from streams.settings import Settings
from streams.topics import create_topics
from streams.transport import BatchConsumer

pytestmark = pytest.mark.integration

PARTITIONS = 4
SESSION_S = 2.0


async def _ignore(records: list[ConsumerRecord[bytes, bytes]]) -> None:
    return None


def _settings(broker: ManagedProcess, unique: str, worker_id: str) -> Settings:
    return Settings(
        kafka_brokers=broker.address,
        topic_prefix=unique,
        app_id=unique,
        partitions=PARTITIONS,
        fetch_max_wait_ms=50,
        session_timeout_s=SESSION_S,
        worker_id=worker_id,
    )


def _numbers(stage: BatchConsumer) -> set[int]:
    return {tp.partition for tp in stage.assigned}


async def _three_stages_two_workers(broker: ManagedProcess) -> dict[str, list[set[int]]]:
    unique = f"copart-{uuid.uuid4().hex[:8]}"
    settings = {w: _settings(broker, unique, w) for w in ("worker-0", "worker-1")}
    topics = settings["worker-0"].topics
    await create_topics(settings["worker-0"])
    inputs = {
        "conversation": topics.conversations,
        "llm": topics.llm_requests,
        "delivery": topics.delivery_requests,
    }
    stages: dict[str, dict[str, BatchConsumer]] = {w: {} for w in settings}
    runs: list[asyncio.Future[None]] = []
    try:
        # worker-1 joins first in one group, last in the others
        for stage, order in zip(
            inputs,
            (("worker-1", "worker-0"), ("worker-0", "worker-1"), ("worker-1", "worker-0")),
            strict=True,
        ):
            for worker in order:
                consumer = BatchConsumer(settings[worker], stage, [inputs[stage]], _ignore)
                stages[worker][stage] = consumer
                await consumer.start()
                runs.append(asyncio.ensure_future(consumer.run()))

        def settled() -> bool:
            return all(
                sum(len(stages[w][s].assigned) for w in stages) == PARTITIONS
                and all(stages[w][s].assigned for w in stages)
                for s in inputs
            )

        assert await until(settled, 30), "the groups did not settle with both workers in each"
        return {w: [_numbers(stages[w][s]) for s in inputs] for w in stages}
    finally:
        for consumer in [c for per in stages.values() for c in per.values()]:
            consumer.stop_soon()
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 15)
        for consumer in [c for per in stages.values() for c in per.values()]:
            await consumer.close()


def test_each_worker_gets_the_same_partition_numbers_in_every_stage(
    broker: ManagedProcess,
) -> None:
    owned = asyncio.run(_three_stages_two_workers(broker))
    assert owned["worker-0"] == [{0, 1}] * 3, owned
    assert owned["worker-1"] == [{2, 3}] * 3, owned


async def _mixed_group(broker: ManagedProcess, *, old_first: bool) -> tuple[set[int], set[int]]:
    """A worker of the previous release (aiokafka's range assignor only) and one of this
    release in one group, the old one joining first or last; their partitions once settled."""
    unique = f"copart-{uuid.uuid4().hex[:8]}"
    settings = _settings(broker, unique, "worker-new")
    await create_topics(settings)
    old = AIOKafkaConsumer(
        settings.topics.conversations,
        bootstrap_servers=settings.broker_list(),
        group_id=f"{unique}.conversation",
        session_timeout_ms=int(SESSION_S * 1000),
        heartbeat_interval_ms=500,
        partition_assignment_strategy=(RangePartitionAssignor,),
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    new = BatchConsumer(settings, "conversation", [settings.topics.conversations], _ignore)
    tasks: list[asyncio.Future[None]] = []
    polling = True

    async def poll_old() -> None:  # keeps the old member in its rejoin rounds
        while polling:
            await old.getmany(timeout_ms=100)

    async def start_old() -> None:
        await old.start()
        tasks.append(asyncio.ensure_future(poll_old()))

    async def start_new() -> None:
        await new.start()
        tasks.append(asyncio.ensure_future(new.run()))

    try:
        if old_first:
            await start_old()
            assert await until(lambda: len(old.assignment()) == PARTITIONS, 30)
            await start_new()
        else:
            await start_new()
            assert await until(lambda: len(new.assigned) == PARTITIONS, 30)
            await start_old()
        assert await until(
            lambda: (
                len(new.assigned) + len(old.assignment()) == PARTITIONS
                and bool(new.assigned)
                and bool(old.assignment())
            ),
            30,
        ), "the mixed group did not give both members partitions"
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        assert not failed, f"a member failed: {[t.exception() for t in failed]}"
        return _numbers(new), {tp.partition for tp in old.assignment()}
    finally:
        polling = False
        new.stop_soon()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        await new.close()
        await old.stop()


@pytest.mark.parametrize("old_first", [True, False], ids=["old-joins-first", "new-joins-first"])
def test_a_group_mixing_releases_assigns_every_partition_whichever_joins_first(
    broker: ManagedProcess, old_first: bool
) -> None:
    """A rolling upgrade (old first) and a rollback (new first): both members get partitions."""
    new, old = asyncio.run(_mixed_group(broker, old_first=old_first))
    assert new | old == set(range(PARTITIONS))
    assert not new & old
