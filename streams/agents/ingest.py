"""The ingest agent: decode + validate, pre-process, dedup, route — in one pass, no extra hop."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from processors.preprocess import Accepted, dedup_key, preprocess
from processors.router import RouteDecision
from schemas.errors import DecodeError, UnknownSchemaError
from schemas.models import (
    ConversationEvent,
    ConversationEventKind,
    DeliveryRequest,
    InboundMessage,
    MessageType,
    utcnow,
)
from streams.agents.common import RawMessage, dead_letter, remember_after_ack, send_record
from streams.metrics import DROPPED, RECORDS_IN, STAGE_ERRORS
from streams.runtime import Runtime

__all__ = ["COMMAND_KEY", "handle_inbound", "register"]

COMMAND_KEY = "switchboard.command"
"""Metadata key of lifecycle commands: ``close`` or ``handoff`` (content = the reason)."""
_COMMANDS = {
    "close": ConversationEventKind.CLOSE,
    "handoff": ConversationEventKind.HANDOFF,
}

log = logging.getLogger(__name__)
STAGE = "ingest"


async def _decode(rt: Runtime, data: bytes) -> InboundMessage:
    try:
        return rt.codec.decode_inbound(data)
    except UnknownSchemaError as exc:
        if exc.schema_id is None or rt.settings.schema_registry_url is None:
            raise
        await rt.codec.resolve(exc.schema_id)
        return rt.codec.decode_inbound(data)


async def handle_inbound(rt: Runtime, topics: dict[str, Any], message: RawMessage) -> None:
    """Process one record of the inbound topic; every outcome is a record on some topic."""
    RECORDS_IN.labels(STAGE).inc()
    dlq = topics["deadletter"]
    value = message.value if isinstance(message.value, bytes) else b""
    try:
        inbound = await _decode(rt, value)
    except DecodeError as exc:
        await dead_letter(
            rt, dlq, message, stage="ingest.decode", reason=exc.reason, error_type=exc.error_type
        )
        return
    result = preprocess(inbound, rt.config.preprocess, utcnow())
    if not isinstance(result, Accepted):
        await dead_letter(
            rt,
            dlq,
            message,
            stage=result.stage,
            reason=result.reason,
            error_type=result.error_type,
            message_id=inbound.message_id,
            tenant=inbound.tenant,
        )
        return
    msg = result.message
    window = rt.config.preprocess.dedup_window_s
    key = dedup_key(msg)
    if window and await rt.store.seen(key):
        DROPPED.labels(STAGE, "duplicate_message_id").inc()
        log.info("dropped duplicate message %s", msg.message_id)
        return
    decision = rt.router.route(msg)
    acks: list[Awaitable[Any]] = []
    if decision.kind == "drop":
        await dead_letter(
            rt,
            dlq,
            message,
            stage="route",
            reason=f"dropped by rule {decision.rule!r}: {decision.target}",
            error_type="RouteDropped",
            message_id=msg.message_id,
            tenant=msg.tenant,
        )
    elif decision.kind == "persona":
        acks.append(
            await _to_conversation(rt, topics, message, msg, result.conversation_id, decision)
        )
    else:
        acks.extend(await _to_flow(rt, topics, message, msg, decision))
    if window and acks:
        remember_after_ack(rt, key, window, acks)


async def _to_conversation(
    rt: Runtime,
    topics: dict[str, Any],
    message: RawMessage,
    msg: InboundMessage,
    conversation_id: str,
    decision: RouteDecision,
) -> Awaitable[Any]:
    command = msg.metadata.get(COMMAND_KEY, "")
    kind = _COMMANDS.get(command, ConversationEventKind.TURN)
    event = ConversationEvent(
        event_id=msg.message_id,
        conversation_id=conversation_id,
        tenant=msg.tenant,
        kind=kind,
        persona=decision.target,
        route_rule=decision.rule,
        override_continuity=decision.override_continuity,
        content=msg.content,
        channel=msg.channel,
        sender=msg.sender,
        subject=msg.subject,
        priority=msg.priority,
        in_response_to=msg.in_response_to,
        metadata=msg.metadata,
        origin_created_at=msg.created_at,
        created_at=utcnow(),
    )
    return await send_record(
        rt, topics["conversations"], event, key=conversation_id, stage=STAGE, parent=message
    )


async def _to_flow(
    rt: Runtime,
    topics: dict[str, Any],
    message: RawMessage,
    msg: InboundMessage,
    decision: RouteDecision,
) -> list[Awaitable[Any]]:
    flow = rt.config.flows[decision.target]
    try:
        content = flow.template.format(content=msg.content, subject=msg.subject or "")
    except (KeyError, IndexError, ValueError) as exc:
        STAGE_ERRORS.labels(STAGE, "TemplateError").inc()
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="route",
            reason=f"flow {decision.target!r}: template failed: {exc!r}",
            error_type="TemplateError",
            message_id=msg.message_id,
            tenant=msg.tenant,
        )
        return []
    acks: list[Awaitable[Any]] = []
    recipients = msg.recipients or [msg.sender]
    for index, recipient in enumerate(recipients):
        request = DeliveryRequest(
            delivery_id=f"{msg.message_id}:{decision.target}:{index}",
            message_id=msg.message_id,
            conversation_id=msg.conversation_id,
            tenant=msg.tenant,
            channel=flow.channel or msg.channel,
            recipient=recipient,
            subject=msg.subject,
            content=content,
            content_type=msg.content_type,
            message_type=msg.message_type
            if msg.message_type != MessageType.CHAT
            else MessageType.NOTIFICATION,
            priority=msg.priority,
            metadata=msg.metadata,
            origin_created_at=msg.created_at,
            created_at=utcnow(),
            scheduled_for=msg.scheduled_for,
        )
        acks.append(
            await send_record(
                rt,
                topics["delivery_requests"],
                request,
                key=recipient,
                stage=STAGE,
                parent=message,
            )
        )
    return acks


def register(app: Any, rt: Runtime, topics: dict[str, Any]) -> None:
    """Register the ingest agent on ``app`` (consumes the inbound topic)."""

    @app.agent(topics["inbound"], name="ingest")  # type: ignore[untyped-decorator]  # faust decorators are untyped
    async def ingest(stream: Any) -> None:
        await rt.start()
        async for event in stream.events():
            try:
                await handle_inbound(rt, topics, event.message)
            except Exception as exc:  # a bad record must never stop the partition
                STAGE_ERRORS.labels(STAGE, type(exc).__name__).inc()
                log.exception("ingest failed on offset %s", event.message.offset)
                await dead_letter(
                    rt,
                    topics["deadletter"],
                    event.message,
                    stage="ingest.internal",
                    reason=f"unexpected error: {exc!r}",
                    error_type=type(exc).__name__,
                )
