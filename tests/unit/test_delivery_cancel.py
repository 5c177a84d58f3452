"""A cancelled delivery stops sending: a batch given up on revoke must not go on delivering.

tenacity's attempt block catches every exception, ``asyncio.CancelledError`` included, and
the retry predicate decides; it used to call a cancelled send retriable, so a delivery batch
cancelled by ``BatchConsumer`` (``guard_batch``'s grace period after a revoke) retried the
send, lost the cancellation when a retry succeeded, and went on with the next requests while
the revoke waited. Real Runtime, real ``deliver``/``handle_batch``/``BatchConsumer``; only
the provider, Redis and the broker are doubles.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from support.producer import RecordingProducer
from support.records import consumed, webhook_request

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import OptionValue, register_connector, unregister_connector
from connectors.errors import DeliveryError
from schemas.models import DeliveryRequest
from streams.agents.common import UnmarkedKeys
from streams.agents.delivery import deliver, handle_batch
from streams.runtime import Runtime
from streams.settings import Settings, load_config
from streams.stack import config_variant
from streams.transport import BatchConsumer

TOPICS = {
    "delivery_requests": "t.delivery.requests",
    "delivery_reports": "t.delivery.reports",
    "deadletter": "t.deadletter",
}
TP = TopicPartition(TOPICS["delivery_requests"], 0)
SEND_S = 0.3
"""How long a send after the first takes (an HTTP call in flight)."""


@dataclass
class Provider(DeliveryConnector):
    """Fails the first send with a retriable 503; every later send takes ``SEND_S`` and
    succeeds. Records the delivery id of each send as it starts."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    in_retry: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the second send (the first retry) started."""

    async def send(self, request: DeliveryRequest) -> SendResult:
        self.started.append(request.delivery_id)
        if len(self.started) == 1:
            raise DeliveryError("503 Service Unavailable", retriable=True)
        self.in_retry.set()
        await asyncio.sleep(SEND_S)
        self.finished.append(request.delivery_id)
        return SendResult(provider_message_id=f"ok:{request.delivery_id}")


class NothingDelivered:
    """The Redis idempotency store: no delivery id was delivered before."""

    async def seen_many(self, keys: list[str]) -> list[bool]:
        return [False] * len(keys)

    async def mark_many(self, keys: list[str], ttl_s: int) -> None:
        return None


@dataclass
class Setup:
    rt: Runtime
    provider: Provider
    producer: RecordingProducer


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    name = f"provider-{uuid.uuid4().hex[:8]}"
    provider = Provider()

    def factory(options: Mapping[str, OptionValue], *, data_dir: Path) -> DeliveryConnector:
        return provider

    register_connector(name, factory)

    def change(raw: dict[str, Any]) -> None:
        raw["channels"]["webhook"] = {"connector": name, "options": {}}
        raw["delivery"] = {"max_attempts": 5, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}

    rt = Runtime(Settings(data_dir=tmp_path), load_config(config_variant(tmp_path, change)))
    producer = RecordingProducer()
    rt.kafka = producer  # type: ignore[assignment]
    rt.idempotency = NothingDelivered()  # type: ignore[assignment]
    try:
        yield Setup(rt, provider, producer)
    finally:
        unregister_connector(name)


def _request(delivery_id: str) -> DeliveryRequest:
    return webhook_request(delivery_id, "acme")


def _record(rt: Runtime, offset: int, request: DeliveryRequest) -> Any:
    value = rt.codec.encode(request)
    return consumed(TP.topic, TP.partition, offset, value, key=request.recipient.encode())


async def test_a_delivery_cancelled_during_a_retried_send_ends_cancelled(setup: Setup) -> None:
    task = asyncio.ensure_future(deliver(setup.rt, _request("d-1")))
    await asyncio.wait_for(setup.provider.in_retry.wait(), 1)

    task.cancel()
    await asyncio.wait({task}, timeout=1)

    assert task.cancelled()  # not a DeliveryReport of a retry that succeeded
    await asyncio.sleep(SEND_S + 0.1)  # a retry, had there been one, would have finished
    assert setup.provider.started == ["d-1", "d-1"]
    assert setup.provider.finished == []


async def test_a_delivery_batch_given_up_on_revoke_stops_sending(setup: Setup) -> None:
    stage = BatchConsumer(
        setup.rt.settings,
        "delivery",
        [TP.topic],
        partial(handle_batch, setup.rt, TOPICS, unmarked=UnmarkedKeys(100)),
    )
    stage.assigned = {TP}
    stage.abandon_after_s = 0.05  # the grace period before the batch is cancelled
    seeks: list[tuple[TopicPartition, int]] = []
    commits: list[Any] = []
    stage.consumer.seek = lambda tp, offset: seeks.append((tp, offset))  # type: ignore[method-assign]

    async def commit(offsets: Any) -> None:
        commits.append(offsets)

    stage.consumer.commit = commit  # type: ignore[method-assign]
    records = [_record(setup.rt, 7 + n, _request(f"d-{n + 1}")) for n in range(3)]

    handling = asyncio.ensure_future(stage._handle({TP: records}, stage._generation))
    await asyncio.wait_for(setup.provider.in_retry.wait(), 1)  # d-1's retry is in flight
    started = time.monotonic()
    await asyncio.wait_for(stage._revoked({TP}), timeout=5)
    revoke_s = time.monotonic() - started
    await asyncio.sleep(SEND_S + 0.1)  # a retry, had there been one, would have finished

    assert revoke_s < 1.0  # grace 0.05 s, then cancelled at once (loose: not a timing test)
    assert handling.done()
    assert handling.exception() is None
    assert setup.provider.started == ["d-1", "d-1"]  # d-2 and d-3 were never sent
    assert setup.provider.finished == []
    reports = [s for s in setup.producer.sent if s.topic == TOPICS["delivery_reports"]]
    assert reports == []
    assert seeks == [(TP, 7)]  # handled again from its first offset, by the next owner
    assert commits == []
    assert stage.assigned == set()
    await stage.close()
