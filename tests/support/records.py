"""Records for stage tests: consumed Kafka records, a delivery request, an LLM response."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from schemas.models import (
    Channel,
    DeliveryRequest,
    LLMRequest,
    LLMResponse,
    LLMStatus,
    utcnow,
)


def consumed(
    topic: str,
    partition: int,
    offset: int,
    value: bytes | None,
    *,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> ConsumerRecord[bytes, bytes]:
    """A record as ``AIOKafkaConsumer.getmany`` hands it out (timestamp 0, sizes from the
    key and value)."""
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=headers or [],
    )


def webhook_request(delivery_id: str, tenant: str) -> DeliveryRequest:
    """A delivery of "hello" to one webhook recipient (so its sends run one after another)."""
    now = utcnow()
    return DeliveryRequest(
        delivery_id=delivery_id,
        message_id=f"m-{delivery_id}",
        conversation_id="c-1",
        tenant=tenant,
        channel=Channel.WEBHOOK,
        recipient="https://example.com/hook",
        content="hello",
        origin_created_at=now,
        created_at=now,
    )


def llm_answer(
    request: LLMRequest, content: str | None = None, status: LLMStatus = LLMStatus.OK
) -> LLMResponse:
    """The local engine's response to ``request`` (default content ``"answer to <turn id>"``),
    made when the request was."""
    return LLMResponse(
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        tenant=request.tenant,
        turn_id=request.turn_id,
        persona=request.persona,
        status=status,
        content=f"answer to {request.turn_id}" if content is None else content,
        engine="local",
        created_at=request.created_at,
    )
