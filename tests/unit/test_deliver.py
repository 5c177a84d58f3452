"""The delivery stage's send policy (``streams.agents.delivery.deliver``) on a real Runtime.

The connector is a registered test connector that fails a scripted number of times, so the
retry loop, its attempt count, ``Retry-After`` and the non-retriable path are all observed
through the DeliveryReport the stage would send.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import OptionValue, register_connector, unregister_connector
from connectors.errors import DeliveryError
from schemas.models import Channel, DeliveryRequest, DeliveryStatus, utcnow
from streams.agents.delivery import deliver
from streams.runtime import Runtime
from streams.settings import Settings, load_config
from streams.stack import config_variant


class Scripted(DeliveryConnector):
    """Raises the scripted errors in turn, then succeeds; records when each call came."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls: list[float] = []

    async def send(self, request: DeliveryRequest) -> SendResult:
        self.calls.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return SendResult(provider_message_id=f"ok:{request.delivery_id}")


@dataclass
class Setup:
    rt: Runtime
    errors: list[Exception]
    """What the connector raises, in turn, before it succeeds (filled by each test)."""
    built: list[Scripted]

    @property
    def calls(self) -> list[float]:
        return self.built[0].calls


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Setup]:
    name = f"scripted-{uuid.uuid4().hex[:8]}"
    built: list[Scripted] = []
    errors: list[Exception] = []

    def factory(options: Mapping[str, OptionValue], *, data_dir: Path) -> DeliveryConnector:
        connector = Scripted(errors)
        built.append(connector)
        return connector

    register_connector(name, factory)

    def change(raw: dict[str, Any]) -> None:
        raw["channels"]["webhook"] = {"connector": name, "options": {}}
        raw["delivery"] = {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.02}

    config = load_config(config_variant(tmp_path, change))
    try:
        yield Setup(Runtime(Settings(data_dir=tmp_path), config), errors, built)
    finally:
        unregister_connector(name)


def _request() -> DeliveryRequest:
    now = utcnow()
    return DeliveryRequest(
        delivery_id="d-1",
        message_id="m-1",
        conversation_id="c-1",
        tenant="acme",
        channel=Channel.WEBHOOK,
        recipient="https://example.com/hook",
        content="hello",
        origin_created_at=now,
        created_at=now,
    )


async def test_first_attempt_success_reports_one_attempt(
    scripted: Setup,
) -> None:
    report = await deliver(scripted.rt, _request())
    assert report.status == DeliveryStatus.DELIVERED
    assert report.attempts == 1
    assert report.provider_message_id == "ok:d-1"
    assert len(scripted.calls) == 1


async def test_retriable_failures_are_retried_until_success(
    scripted: Setup,
) -> None:
    scripted.errors.extend([DeliveryError("503", retriable=True), RuntimeError("connection reset")])
    report = await deliver(scripted.rt, _request())
    assert report.status == DeliveryStatus.DELIVERED
    assert report.attempts == 3
    assert report.error is None
    assert len(scripted.calls) == 3


async def test_retries_stop_at_max_attempts_with_the_last_error(
    scripted: Setup,
) -> None:
    scripted.errors.extend([DeliveryError(f"503 #{n}", retriable=True) for n in range(5)])
    report = await deliver(scripted.rt, _request())
    assert report.status == DeliveryStatus.FAILED
    assert report.attempts == 3
    assert report.error == "DeliveryError: 503 #2"
    assert len(scripted.calls) == 3


async def test_non_retriable_failure_is_not_retried(
    scripted: Setup,
) -> None:
    scripted.errors.append(DeliveryError("400 bad recipient", retriable=False))
    report = await deliver(scripted.rt, _request())
    assert report.status == DeliveryStatus.FAILED
    assert report.attempts == 1
    assert report.error == "DeliveryError: 400 bad recipient"
    assert len(scripted.calls) == 1


async def test_retry_after_is_honoured_before_the_first_retry(
    scripted: Setup,
) -> None:
    scripted.errors.append(DeliveryError("429", retriable=True, retry_after=0.3))
    report = await deliver(scripted.rt, _request())
    calls = scripted.calls
    assert report.status == DeliveryStatus.DELIVERED
    assert report.attempts == 2
    assert calls[1] - calls[0] >= 0.3  # the backoff window alone is at most 0.02 s
