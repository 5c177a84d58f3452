"""The conversation agent: one table entry per conversation, at most one LLM turn in flight.

Consumes the conversations topic (user turns and lifecycle commands) and the LLM responses
topic, both keyed by conversation_id and co-partitioned with the table's changelog. Every
input goes through one pure function of ``processors.conversation``; the agent stores the new
state and sends the effects. A timer sends ``timeout`` ticks for conversations whose LLM turn
is overdue or that are idle, so deadlines and inactivity timeouts survive restarts (the state
lives in the changelog-backed table, the ticks are ordinary records).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

from processors.config import ConversationConfig
from processors.conversation import (
    check_timeout,
    next_due_at,
    on_close,
    on_llm_response,
    on_user_turn,
    reissue_due,
    summarize,
)
from processors.conversation_state import (
    Closed,
    ConversationState,
    Deliver,
    Dropped,
    IssueLLM,
    Transition,
)
from processors.preprocess import conversation_key
from schemas.errors import DecodeError
from schemas.models import (
    ConversationEvent,
    ConversationEventKind,
    LLMResponse,
    utcnow,
)
from streams.agents.common import (
    RawMessage,
    batches,
    dead_letter,
    guard_batch,
    internal_error,
    send_record,
)
from streams.metrics import CONVERSATIONS_ENDED, DROPPED, RECORDS_IN
from streams.runtime import Runtime

__all__ = ["apply", "register"]

log = logging.getLogger(__name__)
STAGE = "conversation"


def apply(
    rt: Runtime,
    state: ConversationState | None,
    record: ConversationEvent | LLMResponse,
    now: datetime,
) -> Transition | None:
    """Run the pure state machine for one input; None when there is no state to touch."""
    cfg = rt.config.conversation
    if isinstance(record, LLMResponse):
        return on_llm_response(state, record, cfg=cfg, now=now)
    if record.kind == ConversationEventKind.TURN:
        return on_user_turn(
            state,
            record,
            persona=record.persona or rt.config.routing.default_persona,
            override_continuity=record.override_continuity,
            continuity=rt.config.routing.continuity,
            cfg=cfg,
            personas=rt.config.personas,
            now=now,
        )
    if record.kind in (ConversationEventKind.CLOSE, ConversationEventKind.HANDOFF):
        return on_close(state, record, now)
    if state is None:
        return None
    reissued = reissue_due(state, now, cfg)
    timed = check_timeout(reissued.state, now, cfg)
    return Transition(timed.state, [*reissued.effects, *timed.effects])


def _decode(rt: Runtime, message: RawMessage) -> ConversationEvent | LLMResponse:
    data = message.value if isinstance(message.value, bytes) else b""
    record = rt.codec.decode_any(data)
    if not isinstance(record, ConversationEvent | LLMResponse):
        raise DecodeError(
            f"unexpected record {type(record).__name__} on {message.topic}",
            error_type="ValidationError",
        )
    return record


class Batch:
    """States changed by a batch of inputs, and the acknowledgements of what it produced.

    States are written to the table only after every record the batch produced was
    acknowledged: a worker killed in between would otherwise restore a state that says
    "answered" for a reply that was never sent, and drop the replayed response as a duplicate.
    Replaying the inputs re-creates the same records with the same ids, which the next stages
    drop. One acknowledgement wait per batch instead of per record keeps this cheap.
    """

    def __init__(self, table: Any, index: DueIndex | None = None) -> None:
        self.table = table
        self.index = index
        self.states: dict[bytes, ConversationState | None] = {}
        self.changed: set[bytes] = set()
        self.acks: list[Awaitable[Any]] = []

    def get(self, key: bytes) -> ConversationState | None:
        """The state as of the inputs applied so far (staged, else stored)."""
        if key in self.states:
            return self.states[key]
        stored = self.table.get(key)
        state = ConversationState.model_validate_json(stored) if stored is not None else None
        self.states[key] = state
        return state

    async def commit(self) -> None:
        """Wait for every produced record, write the changed states, and hand the changelog
        records to the Kafka producer before the batch's inputs may be acknowledged.

        Faust buffers table writes (``send_soon``) and its pre-commit flush gives up on that
        buffer after 0.1 s without progress; draining it here means the offset commit that
        follows always flushes the changelog records with it.
        """
        await asyncio.gather(*self.acks)
        for key, state in self.states.items():
            if state is not None and key in self.changed:
                self.table[key] = state.model_dump_json().encode()
                if self.index is not None:
                    self.index.update(key, state)
        buffer = self.table.app.producer.buffer
        while buffer.size:
            await buffer.flush_atmost(buffer.size)

    def stage(self, key: bytes, state: ConversationState) -> None:
        """Record the new state of ``key`` (written by ``commit``)."""
        self.states[key] = state
        self.changed.add(key)


async def _handle(rt: Runtime, topics: dict[str, Any], batch: Batch, message: RawMessage) -> None:
    RECORDS_IN.labels(STAGE).inc()
    try:
        record = _decode(rt, message)
    except DecodeError as exc:
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="conversation.decode",
            reason=exc.reason,
            error_type=exc.error_type,
        )
        return
    key = conversation_key(record.tenant, record.conversation_id).encode()
    before = batch.get(key)
    transition = apply(rt, before, record, utcnow())
    if transition is None:
        return
    is_tick = isinstance(record, ConversationEvent) and record.kind == ConversationEventKind.TIMEOUT
    if is_tick and not transition.effects and transition.state == before:
        return  # a tick that found nothing due: no changelog write
    for effect in transition.effects:
        if isinstance(effect, IssueLLM):
            batch.acks.append(
                await send_record(
                    rt, topics["llm_requests"], effect.request, key=key, stage=STAGE, parent=message
                )
            )
        elif isinstance(effect, Deliver):
            batch.acks.append(
                await send_record(
                    rt,
                    topics["delivery_requests"],
                    effect.request,
                    key=effect.request.recipient,
                    stage=STAGE,
                    parent=message,
                )
            )
        elif isinstance(effect, Dropped):
            DROPPED.labels(STAGE, effect.reason).inc()
            log.debug("dropped %s: %s", effect.event_id, effect.reason)
        elif isinstance(effect, Closed):
            log.info("conversation %s ended: %s", record.conversation_id, effect.reason)
            summary = summarize(transition.state, effect.reason, utcnow())
            CONVERSATIONS_ENDED.labels(summary.status).inc()
            batch.acks.append(
                await send_record(
                    rt, topics["analytics"], summary, key=key, stage=STAGE, parent=message
                )
            )
    batch.stage(key, transition.state)


class DueIndex:
    """When each conversation next needs a timer tick (LLM deadline or inactivity timeout).

    Kept up to date from every batch the agent commits, so a timer run looks at a dict instead
    of parsing every stored state. The whole table is rescanned when it holds keys the index
    has never seen (states restored from the changelog after a restart or a rebalance), and
    at the latest every ``rescan_s`` seconds.
    """

    def __init__(self, cfg: ConversationConfig, rescan_s: float) -> None:
        self.cfg = cfg
        self.rescan_s = rescan_s
        self._due: dict[bytes, tuple[datetime, str, str]] = {}
        self._known: set[bytes] = set()
        self._scanned_at: datetime | None = None

    def update(self, key: bytes, state: ConversationState) -> None:
        """Record the next due time of ``key`` (or forget it when nothing is due)."""
        self._known.add(key)
        due = next_due_at(state, self.cfg)
        if due is None:
            self._due.pop(key, None)
        else:
            self._due[key] = (due, state.tenant, state.conversation_id)

    def rescan(self, table: Any, now: datetime) -> None:
        """Rebuild from the table when it has unseen keys or the last scan is ``rescan_s`` old."""
        recent = (
            self._scanned_at is not None
            and (now - self._scanned_at).total_seconds() < self.rescan_s
        )
        if recent and len(table) <= len(self._known):
            return
        self._due.clear()
        self._known.clear()
        for key, stored in list(table.items()):
            self.update(key, ConversationState.model_validate_json(stored))
        self._scanned_at = now

    def forget(self, key: bytes) -> None:
        """Drop ``key`` (its partition now belongs to another worker)."""
        self._due.pop(key, None)

    def take_due(self, now: datetime, retry_s: float) -> list[tuple[bytes, str, str]]:
        """(key, tenant, conversation_id) of the conversations due at ``now``; each is asked
        again after ``retry_s`` unless a commit updates it first (the tick's own processing
        normally does)."""
        due = [(key, tenant, conv) for key, (at, tenant, conv) in self._due.items() if at <= now]
        later = now + timedelta(seconds=retry_s)
        for key, tenant, conv in due:
            self._due[key] = (later, tenant, conv)
        return due


def _owned_partitions(app: Any, topic: str) -> set[int] | None:
    """Partitions of ``topic`` this worker actively owns, or None when not known yet."""
    try:
        actives = app.assignor.assigned_actives()
    except Exception:  # before the first assignment
        return None
    return {tp.partition for tp in actives if tp.topic == topic} or None


def register(app: Any, rt: Runtime, topics: dict[str, Any], table: Any) -> None:
    """Register the conversation agent and its deadline/timeout timer on ``app``."""
    cfg = rt.config.conversation
    interval = max(0.5, min(cfg.llm_deadline_s / 4, cfg.inactivity_timeout_s / 4, 30.0))
    index = DueIndex(cfg, rescan_s=max(10 * interval, 30.0))

    @app.agent(topics["conversation_inputs"], name="conversation")  # type: ignore[untyped-decorator]  # faust decorators are untyped
    async def conversation(stream: Any) -> None:
        await rt.start()
        async for events in batches(stream):
            messages = [event.message for event in events]

            async def run_batch(messages: list[RawMessage] = messages) -> None:
                batch = Batch(table, index)  # a retried batch starts again from the table
                for message in messages:
                    try:
                        await _handle(rt, topics, batch, message)
                    except Exception as exc:  # a bad record must never stop the partition
                        await internal_error(rt, topics, message, exc, stage=STAGE)
                await batch.commit()

            await guard_batch(STAGE, run_batch)

    @app.timer(interval=interval)  # type: ignore[untyped-decorator]  # faust decorators are untyped
    async def conversation_ticks() -> None:
        now = utcnow()
        index.rescan(table, now)
        owned = _owned_partitions(app, rt.settings.topics.conversations)
        for key, tenant, conversation_id in index.take_due(now, retry_s=interval):
            if (
                owned is not None
                and app.producer.key_partition(rt.settings.topics.conversations, key).partition
                not in owned
            ):
                index.forget(key)  # revoked: the new owner ticks it from its own index
                continue
            tick = ConversationEvent(
                event_id=f"tick:{uuid.uuid4()}",
                conversation_id=conversation_id,
                tenant=tenant,
                kind=ConversationEventKind.TIMEOUT,
                origin_created_at=now,
                created_at=now,
            )
            await send_record(rt, topics["conversations"], tick, key=key, stage=STAGE)
