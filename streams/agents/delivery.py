"""The delivery agent: choose the channel's connector, send with retries, report every outcome."""

from __future__ import annotations

import logging
import random
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from connectors.delivery.base import SendResult
from connectors.errors import ConnectorError
from processors.backoff import backoff_delay
from schemas.errors import DecodeError
from schemas.models import DeliveryReport, DeliveryRequest, DeliveryStatus, utcnow
from streams.agents.common import RawMessage, dead_letter, remember_after_ack, send_record
from streams.metrics import DELIVERIES, DROPPED, END_TO_END_LATENCY, RECORDS_IN, STAGE_ERRORS
from streams.runtime import Runtime, UnconfiguredChannelError

__all__ = ["deliver", "register"]

log = logging.getLogger(__name__)
STAGE = "delivery"
_DELIVERED_TTL_S = 7 * 24 * 3600


def _retriable(exc: BaseException) -> bool:
    return not isinstance(exc, ConnectorError) or exc.retriable


async def deliver(rt: Runtime, request: DeliveryRequest) -> DeliveryReport:
    """Send ``request`` through its channel's connector with exponential backoff.

    Retriable errors (``ConnectorError.retriable`` or any non-connector exception) are retried
    up to ``delivery.max_attempts`` times with full-jitter backoff, honouring ``retry_after``.

    Returns:
        A delivered or failed DeliveryReport (never raises for channel failures).
    """
    policy = rt.config.delivery
    rng = random.Random()
    attempts = 0

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, ConnectorError) else None
        return backoff_delay(
            state.attempt_number - 1,
            initial_s=policy.backoff_initial_s,
            max_s=policy.backoff_max_s,
            rng=rng,
            retry_after_s=retry_after,
        )

    connector_name = "none"
    error: str | None = None
    result: SendResult | None = None
    try:
        connector = rt.connector(request.channel)
        connector_name = connector.name
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait,
            retry=retry_if_exception(_retriable),
            reraise=True,
        ):
            with attempt:
                attempts = attempt.retry_state.attempt_number
                result = await connector.send(request)
    except UnconfiguredChannelError as exc:
        error = str(exc)
    except Exception as exc:
        STAGE_ERRORS.labels(STAGE, type(exc).__name__).inc()
        error = f"{type(exc).__name__}: {exc}"
    now = utcnow()
    latency_ms = (now - request.origin_created_at).total_seconds() * 1000.0
    status = DeliveryStatus.DELIVERED if result is not None else DeliveryStatus.FAILED
    DELIVERIES.labels(request.channel.value, connector_name, status.value).inc()
    if result is not None:
        END_TO_END_LATENCY.labels(request.channel.value).observe(latency_ms / 1000.0)
    return DeliveryReport(
        delivery_id=request.delivery_id,
        message_id=request.message_id,
        conversation_id=request.conversation_id,
        tenant=request.tenant,
        channel=request.channel,
        connector=connector_name,
        recipient=request.recipient,
        status=status,
        attempts=max(attempts, 1),
        error=error,
        provider_message_id=result.provider_message_id if result else None,
        content=request.content,
        persona=request.persona,
        origin_created_at=request.origin_created_at,
        created_at=now,
        latency_ms=latency_ms,
    )


async def _handle(rt: Runtime, topics: dict[str, Any], message: RawMessage) -> None:
    RECORDS_IN.labels(STAGE).inc()
    try:
        request = rt.codec.decode(message.value or b"", DeliveryRequest)
    except DecodeError as exc:
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="delivery.decode",
            reason=exc.reason,
            error_type=exc.error_type,
        )
        return
    done_key = f"delivered:{request.delivery_id}"
    if await rt.store.seen(done_key):
        DROPPED.labels(STAGE, "already_delivered").inc()
        return
    report = await deliver(rt, request)
    ack = await send_record(
        rt,
        topics["delivery_reports"],
        report,
        key=request.message_id,
        stage=STAGE,
        parent=message,
    )
    if report.status == DeliveryStatus.DELIVERED:
        remember_after_ack(rt, done_key, _DELIVERED_TTL_S, [ack])
    else:
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="deliver",
            reason=f"delivery failed after {report.attempts} attempt(s): {report.error}",
            error_type="DeliveryFailed",
            message_id=request.message_id,
            tenant=request.tenant,
        )


def register(app: Any, rt: Runtime, topics: dict[str, Any]) -> None:
    """Register the delivery agent on ``app`` (consumes the delivery requests topic)."""

    @app.agent(topics["delivery_requests"], name="delivery")  # type: ignore[untyped-decorator]  # faust decorators are untyped
    async def delivery(stream: Any) -> None:
        await rt.start()
        async for event in stream.events():
            try:
                await _handle(rt, topics, event.message)
            except Exception as exc:  # a bad record must never stop the partition
                STAGE_ERRORS.labels(STAGE, type(exc).__name__).inc()
                log.exception("delivery failed on offset %s", event.message.offset)
                await dead_letter(
                    rt,
                    topics["deadletter"],
                    event.message,
                    stage="delivery.internal",
                    reason=f"unexpected error: {exc!r}",
                    error_type=type(exc).__name__,
                )
