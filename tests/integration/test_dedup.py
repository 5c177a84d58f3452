"""A message id published twice within the dedup window is answered once; a delivery id is
sent once by the delivery stage across consecutive batches."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError
from support.producer import RecordingProducer
from support.records import webhook_request

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import register_connector, unregister_connector
from connectors.redis_store import StoreError
from processors.ids import new_message_id
from schemas.models import DeliveryReport, DeliveryRequest, utcnow
from streams.agents.common import UnmarkedKeys
from streams.agents.delivery import UNMARKED_MAX, handle_batch
from streams.embedded import ManagedProcess
from streams.replay import replay
from streams.runtime import Runtime
from streams.settings import Settings, load_config
from streams.stack import EmbeddedStack, config_variant
from streams.transport import (
    BATCH_MAX,
    PIPELINE_DEPTH,
    BatchContext,
    guard_batch,
    handling,
)
from streams.worker import topic_names

pytestmark = pytest.mark.integration


async def test_second_copy_of_a_message_id_is_not_answered_again(stack: EmbeddedStack) -> None:
    message_id = new_message_id(utcnow())
    line = {
        "message_id": message_id,
        "tenant": "dedup",
        "channel": "chat",
        "sender": "twice@example.com",
        "content": "Hello",
    }
    first = await replay(stack.settings(), [line], timeout_s=60, keep_ids=True)
    assert first.summary()["replies_delivered"] == 1
    second = await replay(stack.settings(), [line], timeout_s=4, keep_ids=True)
    assert second.summary()["unaccounted"] == 1  # dropped as a duplicate: no second outcome
    await asyncio.sleep(1.0)
    outbox = (stack.data_dir / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    delivered = [json.loads(x) for x in outbox if message_id in x]
    assert [d["message_id"] for d in delivered] == [message_id]


# --- The delivery stage across consecutive batches, against a real redis-server -------------


@dataclass
class Counting(DeliveryConnector):
    """Succeeds and counts sends per delivery id."""

    sends: Counter[str] = field(default_factory=Counter)

    async def send(self, request: DeliveryRequest) -> SendResult:
        self.sends[request.delivery_id] += 1
        return SendResult(provider_message_id=f"ok:{request.delivery_id}")


@dataclass
class Stage:
    rt: Runtime
    connector: Counting
    producer: RecordingProducer
    unmarked: UnmarkedKeys
    topics: dict[str, str]
    offset: int = 0

    def record(self, request: DeliveryRequest) -> Any:
        self.offset += 1
        value = self.rt.codec.encode(request)
        return ConsumerRecord(
            topic=self.topics["delivery_requests"],
            partition=0,
            offset=self.offset,
            timestamp=0,
            timestamp_type=0,
            key=request.recipient.encode(),
            value=value,
            checksum=None,
            serialized_key_size=len(request.recipient),
            serialized_value_size=len(value),
            headers=[],
        )

    async def batch(self, *requests: DeliveryRequest) -> BatchContext:
        """Handle one batch as ``BatchConsumer`` does (``guard_batch`` retrying a transient
        error), but leave its after-acknowledgement actions (the Redis marks) to the caller."""
        records = [self.record(r) for r in requests]
        ctx = BatchContext()

        async def attempt() -> None:
            ctx.acks.clear()
            ctx.after.clear()
            with handling(ctx):
                await handle_batch(self.rt, self.topics, records, unmarked=self.unmarked)

        await guard_batch("delivery", attempt)
        return ctx

    async def delivered(self, delivery_id: str) -> bool:
        (seen,) = await self.rt.store.seen_many([f"delivered:{delivery_id}"])
        return seen

    def reports(self) -> list[DeliveryReport]:
        return [
            self.rt.codec.decode(sent.value, DeliveryReport)
            for sent in self.producer.sent
            if sent.topic == self.topics["delivery_reports"]
        ]


async def _acknowledged(ctx: BatchContext) -> None:
    """What ``BatchConsumer`` does once a batch's records were acknowledged."""
    for ack in ctx.acks:
        await ack
    for action in ctx.after:
        await action()


@pytest.fixture
async def stage(redis_server: ManagedProcess, tmp_path: Path) -> AsyncIterator[Stage]:
    name = f"counting-{uuid.uuid4().hex[:8]}"
    connector = Counting()
    register_connector(name, lambda options, *, data_dir: connector)

    def change(raw: dict[str, Any]) -> None:
        raw["channels"]["webhook"] = {"connector": name, "options": {}}

    settings = Settings(
        redis_url=f"redis://{redis_server.address}/0",
        app_id=f"dedup-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path,
    )
    rt = Runtime(settings, load_config(config_variant(tmp_path, change)))
    producer = RecordingProducer()
    rt.kafka = producer  # type: ignore[assignment]
    await rt.start()
    try:
        yield Stage(rt, connector, producer, UnmarkedKeys(UNMARKED_MAX), topic_names(settings))
    finally:
        await rt.aclose()
        unregister_connector(name)


def _request(delivery_id: str) -> DeliveryRequest:
    return webhook_request(delivery_id, "dedup")


async def test_an_id_delivered_in_one_batch_is_not_sent_again_by_the_next_before_its_mark(
    stage: Stage,
) -> None:
    first = await stage.batch(_request("d-1"))
    assert not await stage.delivered("d-1")  # marked only once the report is acknowledged
    # Batch K+1 runs while batch K's acknowledgements are outstanding; a replayed upstream
    # stage re-created the same request.
    second = await stage.batch(_request("d-1"), _request("d-2"))
    assert stage.connector.sends == {"d-1": 1, "d-2": 1}
    assert [r.delivery_id for r in stage.reports()] == ["d-1", "d-2"]

    await _acknowledged(first)
    await _acknowledged(second)
    assert await stage.delivered("d-1")
    assert await stage.delivered("d-2")
    assert len(stage.unmarked) == 0  # marked in Redis: no longer kept in memory
    await _acknowledged(await stage.batch(_request("d-1")))
    assert stage.connector.sends == {"d-1": 1, "d-2": 1}  # Redis alone recognises it now


async def test_a_retried_batch_sends_again_what_its_failed_try_sent(stage: Stage) -> None:
    # The first try delivers d-1, then queuing its report fails for a while (transient):
    # guard_batch drops that try's acknowledgements and runs the batch again.
    stage.producer.raises.append(KafkaTimeoutError())
    ctx = await stage.batch(_request("d-1"))
    assert stage.connector.sends == {"d-1": 2}
    assert [r.delivery_id for r in stage.reports()] == ["d-1"]
    assert "delivered:d-1" in stage.unmarked  # from the try that succeeded
    await _acknowledged(ctx)
    assert await stage.delivered("d-1")
    assert len(stage.unmarked) == 0


async def test_keys_whose_marks_could_not_be_written_keep_deduplicating(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await stage.batch(_request("d-1"))

    async def redis_down(keys: Sequence[str], ttl_s: int) -> None:
        raise StoreError("redis EVALSHA: Connection refused", retriable=True)

    monkeypatch.setattr(stage.rt.store, "mark_many", redis_down)
    await _acknowledged(first)  # logged, not raised
    assert not await stage.delivered("d-1")
    assert "delivered:d-1" in stage.unmarked
    await stage.batch(_request("d-1"))
    assert stage.connector.sends == {"d-1": 1}


def test_unmarked_keys_are_bounded_and_forget_the_oldest_first() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        UnmarkedKeys(0)
    keys = UnmarkedKeys(3)
    keys.add(["a", "b", "c"])
    keys.add(["a"])  # now the newest
    keys.add(["d"])
    assert len(keys) == 3
    assert "b" not in keys
    assert all(k in keys for k in ("a", "c", "d"))
    keys.discard(["c", "never-added"])
    assert len(keys) == 2
    assert UNMARKED_MAX >= PIPELINE_DEPTH * BATCH_MAX  # every outstanding batch's keys fit
