"""The ingest agent: decode + validate, pre-process, dedup, route — in one pass, no extra hop."""

from __future__ import annotations

import logging
from functools import partial

from processors.ids import scoped_id
from processors.preprocess import Accepted, conversation_key, dedup_key, preprocess
from processors.router import RouteDecision
from schemas.errors import DecodeError
from schemas.models import (
    ConversationEvent,
    ConversationEventKind,
    DeliveryRequest,
    InboundMessage,
    MessageType,
    utcnow,
)
from streams.agents.common import (
    RawMessage,
    dead_letter,
    internal_error,
    parse_each,
    remember_after_ack,
    send_record,
)
from streams.metrics import DROPPED, RECORDS_IN, STAGE_ERRORS, child
from streams.runtime import Runtime
from streams.transport import BatchConsumer

__all__ = ["COMMAND_KEY", "handle_batch", "stage"]

COMMAND_KEY = "switchboard.command"
"""Metadata key of lifecycle commands: ``close`` or ``handoff`` (content = the reason)."""
_COMMANDS = {
    "close": ConversationEventKind.CLOSE,
    "handoff": ConversationEventKind.HANDOFF,
}

log = logging.getLogger(__name__)
STAGE = "ingest"


async def _accept(rt: Runtime, topics: dict[str, str], message: RawMessage) -> Accepted | None:
    """Decode, validate and pre-process one record; dead-letter it and return None if bad."""
    child(RECORDS_IN, STAGE).inc()
    dlq = topics["deadletter"]
    value = message.value if isinstance(message.value, bytes) else b""
    try:
        inbound = rt.codec.decode_inbound(value)
    except DecodeError as exc:
        await dead_letter(
            rt, dlq, message, stage="ingest.decode", reason=exc.reason, error_type=exc.error_type
        )
        return None
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
        return None
    return result


async def _route(
    rt: Runtime, topics: dict[str, str], message: RawMessage, accepted: Accepted
) -> None:
    """Route one accepted message and send what the decision says."""
    msg = accepted.message
    decision = rt.router.route(msg)
    if decision.kind == "drop":
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="route",
            reason=f"dropped by rule {decision.rule!r}: {decision.target}",
            error_type="RouteDropped",
            message_id=msg.message_id,
            tenant=msg.tenant,
        )
    elif decision.kind == "persona":
        await _to_conversation(rt, topics, message, msg, accepted.conversation_id, decision)
    else:
        await _to_flow(rt, topics, message, msg, decision)


async def handle_batch(rt: Runtime, topics: dict[str, str], messages: list[RawMessage]) -> None:
    """Process a batch of inbound records; every outcome is a record on some topic.

    Dedup costs one Redis round trip per batch (``MGET``), and the ids are recorded
    (``SET … EX`` in one pipeline) only once the broker acknowledged everything the batch
    produced — marking earlier would lose a message whose output was still in the producer's
    buffer when the worker died: its replay would look like a duplicate.
    """
    accepted = await parse_each(rt, topics, messages, partial(_accept, rt, topics), stage=STAGE)
    window = rt.config.preprocess.dedup_window_s
    keys = [dedup_key(a.message) for _, a in accepted]
    seen = await rt.store.seen_many(keys) if window else [False] * len(keys)
    done: list[str] = []
    in_batch: set[str] = set()
    for (message, result), key, duplicate in zip(accepted, keys, seen, strict=True):
        if duplicate or key in in_batch:
            child(DROPPED, STAGE, "duplicate_message_id").inc()
            log.info("dropped duplicate message %s", result.message.message_id)
            continue
        try:
            await _route(rt, topics, message, result)
        except Exception as exc:
            await internal_error(rt, topics, message, exc, stage=STAGE)
            continue
        done.append(key)
        in_batch.add(key)
    if window and done:
        remember_after_ack(rt, done, window)


async def _to_conversation(
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    msg: InboundMessage,
    conversation_id: str,
    decision: RouteDecision,
) -> None:
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
    key = conversation_key(msg.tenant, conversation_id)
    await send_record(rt, topics["conversations"], event, key=key, stage=STAGE, parent=message)


async def _to_flow(
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    msg: InboundMessage,
    decision: RouteDecision,
) -> None:
    flow = rt.config.flows[decision.target]
    try:
        content = flow.template.format(content=msg.content, subject=msg.subject or "")
    except (KeyError, IndexError, ValueError) as exc:
        child(STAGE_ERRORS, STAGE, "TemplateError").inc()
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
        return
    recipients = msg.recipients or [msg.sender]
    for index, recipient in enumerate(recipients):
        request = DeliveryRequest(
            delivery_id=scoped_id(f"{msg.message_id}:{decision.target}:{index}", msg.tenant),
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
        await send_record(
            rt, topics["delivery_requests"], request, key=recipient, stage=STAGE, parent=message
        )


def stage(rt: Runtime, topics: dict[str, str]) -> BatchConsumer:
    """The ingest stage: consumes the inbound topic in batches (``handle_batch``)."""
    return BatchConsumer(rt.settings, STAGE, [topics["inbound"]], partial(handle_batch, rt, topics))
