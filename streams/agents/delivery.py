"""The delivery agent: choose the channel's connector, send with retries, report every outcome."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from connectors.delivery.base import SendResult
from connectors.errors import ConnectorError
from processors.backoff import backoff_delay
from schemas.errors import DecodeError
from schemas.models import DeliveryReport, DeliveryRequest, DeliveryStatus, utcnow
from streams.agents.common import (
    RawMessage,
    UnmarkedKeys,
    dead_letter,
    internal_error,
    parse_each,
    remember_after_ack,
    send_record,
)
from streams.metrics import DELIVERIES, DROPPED, END_TO_END_LATENCY, RECORDS_IN, STAGE_ERRORS, child
from streams.runtime import Runtime, UnconfiguredChannelError
from streams.transport import BATCH_MAX, PIPELINE_DEPTH, BatchConsumer

__all__ = ["UNMARKED_MAX", "deliver", "handle_batch", "stage"]

log = logging.getLogger(__name__)
STAGE = "delivery"
MAX_CONCURRENT_SENDS = 64
"""Connector sends in flight per worker."""
_DELIVERED_TTL_S = 7 * 24 * 3600
UNMARKED_MAX = 4 * PIPELINE_DEPTH * BATCH_MAX
"""Most delivered-but-not-yet-marked delivery ids a worker's delivery stage keeps in memory
(``UnmarkedKeys``): 16,000, about 2 MB. At most ``PIPELINE_DEPTH`` batches of ``BATCH_MAX``
records wait for their acknowledgements at once, so the bound is only reached when Redis
fails to take marks for a while."""


def _retriable(exc: BaseException) -> bool:
    """Whether a send that raised ``exc`` is tried again: an ``Exception`` that is not a
    ``ConnectorError``, or one marked ``retriable``.

    Never a ``BaseException`` that is not an ``Exception`` (``asyncio.CancelledError``,
    ``KeyboardInterrupt``): tenacity's attempt block catches those too, and retrying a
    cancelled send would swallow the cancellation of a batch given up on revoke, which would
    then go on delivering to the partitions' next owner's recipients.
    """
    if not isinstance(exc, Exception):
        return False
    return not isinstance(exc, ConnectorError) or exc.retriable


async def deliver(rt: Runtime, request: DeliveryRequest) -> DeliveryReport:
    """Send ``request`` through its channel's connector with exponential backoff.

    Retriable errors (``ConnectorError.retriable`` or any non-connector exception) are retried
    up to ``delivery.max_attempts`` times with full-jitter backoff (seconds, from
    ``delivery.backoff_initial_s`` up to ``delivery.backoff_max_s``), honouring
    ``retry_after``.

    Returns:
        A delivered or failed DeliveryReport (never raises for channel failures).

    Raises:
        asyncio.CancelledError: the task was cancelled, during a send or a backoff; no
            further send is started (``_retriable``).
    """
    policy = rt.config.delivery
    attempts = 0

    def delay(retry: int, exc: BaseException | None) -> float:
        retry_after = exc.retry_after if isinstance(exc, ConnectorError) else None
        return backoff_delay(
            retry,
            initial_s=policy.backoff_initial_s,
            max_s=policy.backoff_max_s,
            retry_after_s=retry_after,
        )

    def wait(state: RetryCallState) -> float:  # after retry number attempt_number failed
        return delay(state.attempt_number, state.outcome.exception() if state.outcome else None)

    connector_name = "none"
    error: str | None = None
    result: SendResult | None = None
    try:
        connector = rt.connector(request.channel)
        connector_name = connector.name
        try:
            # The first attempt runs outside the retry loop: most sends succeed at once, and
            # setting up tenacity's loop cost more than the outbox write itself.
            attempts = 1
            result = await connector.send(request)
        except Exception as first:
            if not _retriable(first) or policy.max_attempts <= 1:
                raise
            await asyncio.sleep(delay(0, first))
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(policy.max_attempts - 1),
                wait=wait,
                retry=retry_if_exception(_retriable),
                reraise=True,
            ):
                with attempt:
                    attempts = 1 + attempt.retry_state.attempt_number
                    result = await connector.send(request)
    except UnconfiguredChannelError as exc:
        error = str(exc)
    except Exception as exc:
        child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
        error = f"{type(exc).__name__}: {exc}"
    now = utcnow()
    latency_ms = (now - request.origin_created_at).total_seconds() * 1000.0
    status = DeliveryStatus.DELIVERED if result is not None else DeliveryStatus.FAILED
    child(DELIVERIES, request.channel.value, connector_name, status.value).inc()
    if result is not None:
        child(END_TO_END_LATENCY, request.channel.value).observe(latency_ms / 1000.0)
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


async def _decode(
    rt: Runtime, topics: dict[str, str], message: RawMessage
) -> DeliveryRequest | None:
    child(RECORDS_IN, STAGE).inc()
    try:
        return rt.codec.decode(message.value or b"", DeliveryRequest)
    except DecodeError as exc:
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="delivery.decode",
            reason=exc.reason,
            error_type=exc.error_type,
        )
        return None


async def handle_batch(
    rt: Runtime,
    topics: dict[str, str],
    messages: list[RawMessage],
    max_sends: int = MAX_CONCURRENT_SENDS,
    *,
    unmarked: UnmarkedKeys,
) -> None:
    """Deliver a batch: recipients in parallel (at most ``max_sends`` >= 1 sends at once),
    each recipient's messages one after another in arrival order.

    A request whose delivery id was already delivered is dropped: its idempotency key
    ``delivered:<delivery_id>`` is in Redis (one round trip per batch), in ``unmarked``, or
    earlier in the batch. The keys of this batch's
    deliveries are written to Redis only once the broker acknowledged their reports
    (``remember_after_ack``), so a crash in between leads to a redelivery, not a loss. Until
    then they are in ``unmarked`` (the stage's, kept for the worker's life), which is what lets
    the next batches, handled while these acknowledgements are outstanding, recognise a
    duplicate of an id delivered here.

    A batch that raises (a transient error; ``guard_batch`` runs it again) has added nothing
    to ``unmarked``: the keys are added only at the very end, once every report was queued.
    The retry therefore sends again every request of the failed try that Redis does not
    know, including those the failed try had sent: that try's acknowledgements are dropped
    by ``guard_batch``, so nothing would ever confirm those reports, and skipping the sends
    could lose a report while the request's offset gets committed. A duplicate send on a
    retry is the at-least-once cost, as before; a missing report is not acceptable.

    Args:
        rt: the worker's runtime (connectors, codec, Redis store, producer).
        topics: topic names by role (``delivery_reports``, ``deadletter``).
        messages: the batch, DeliveryRequest records.
        max_sends: most connector sends in flight.
        unmarked: the stage's delivered-but-not-yet-marked keys (``stage`` creates it).

    Raises:
        Exception: a transient error (``is_transient``), for ``guard_batch`` to retry.
    """
    decoded = await parse_each(rt, topics, messages, partial(_decode, rt, topics), stage=STAGE)
    keys = [f"delivered:{r.delivery_id}" for _, r in decoded]
    # Looked up before the Redis round trip: a key leaves ``unmarked`` only after its mark was
    # written, so one missing here is already in Redis for the MGET that follows.
    pending = [key in unmarked for key in keys]
    seen = await rt.store.seen_many(keys)
    groups: dict[tuple[str, str], list[tuple[RawMessage, DeliveryRequest, str]]] = {}
    in_batch: set[str] = set()
    for (message, request), key, marked, delivered_before in zip(
        decoded, keys, seen, pending, strict=True
    ):
        if marked or delivered_before or key in in_batch:
            child(DROPPED, STAGE, "already_delivered").inc()
            continue
        in_batch.add(key)
        groups.setdefault((request.channel.value, request.recipient), []).append(
            (message, request, key)
        )
    delivered: list[str] = []

    async def one_recipient(items: list[tuple[RawMessage, DeliveryRequest, str]]) -> None:
        for message, request, key in items:
            try:
                report = await deliver(rt, request)
                await send_record(
                    rt,
                    topics["delivery_reports"],
                    report,
                    key=request.message_id,
                    stage=STAGE,
                    parent=message,
                )
                if report.status == DeliveryStatus.DELIVERED:
                    delivered.append(key)
                    continue
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
            except Exception as exc:
                await internal_error(rt, topics, message, exc, stage=STAGE)

    queue = iter(groups.values())

    async def sender() -> None:  # one of at most ``max_sends`` taking recipients in turn
        for items in queue:
            await one_recipient(items)

    senders = [asyncio.ensure_future(sender()) for _ in range(min(max_sends, len(groups)))]
    try:
        await asyncio.gather(*senders)
    except BaseException:
        # A transient error retries the whole batch (``guard_batch``): the other senders must
        # not go on sending meanwhile.
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        raise
    if delivered:  # the last step: nothing after it may raise (see above)
        remember_after_ack(rt, delivered, _DELIVERED_TTL_S, unmarked=unmarked)


def stage(rt: Runtime, topics: dict[str, str]) -> BatchConsumer:
    """The delivery stage: consumes the delivery requests topic in batches (``handle_batch``),
    with its own ``UnmarkedKeys`` of at most ``UNMARKED_MAX`` delivery ids."""
    unmarked = UnmarkedKeys(UNMARKED_MAX)
    return BatchConsumer(
        rt.settings,
        STAGE,
        [topics["delivery_requests"]],
        partial(handle_batch, rt, topics, unmarked=unmarked),
    )
