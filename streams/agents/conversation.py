"""The conversation agent: one table entry per conversation, at most one LLM turn in flight.

Consumes the conversations topic (user turns and lifecycle commands) and the LLM responses
topic, both keyed by conversation_id and co-partitioned with the table's changelog. Every
input goes through one pure function of ``processors.conversation``; the agent stores the new
state and sends the effects. A timer sends ``timeout`` ticks for conversations whose LLM turn
is overdue, that are idle, or that ended ``ended_retention_s`` ago, so deadlines, inactivity
timeouts and pruning survive restarts (the state lives in the changelog-backed table, the
ticks are ordinary records). A tick for a conversation due for pruning deletes its state: it
leaves the table and a tombstone goes to the changelog, counted in
``switchboard_dropped_total{stage="conversation",reason="pruned"}``.

A new state must fit in one changelog record: a state that cannot be written would make the
worker exit after the batch and, replayed, crash every worker that takes the partition. So
each new state is encoded before the input's effects are sent. One larger than
``ChangelogTable.max_value_bytes`` first sheds its oldest history turns (context for the LLM,
``shed_history``; counted in ``switchboard_history_turns_shed_total``), so that a conversation
near the limit keeps answering. One still too large without the older history (the turns the
input added stay) is not applied: the old state stays, none of the effects are sent, the input
is dead-lettered (stage ``conversation.state``, error_type
``StateTooLarge``, the sizes in the reason) and counted in
``switchboard_stage_errors_total{stage="conversation",error_type="StateTooLarge"}``. The
bytes measured are the ones the table writes (``Encoded``): each state is encoded once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from processors.business_rules import failure_reply
from processors.conversation import (
    check_timeout,
    no_answer,
    on_close,
    on_llm_response,
    on_user_turn,
    prune_due,
    reissue_due,
    shed_history,
    summarize,
    trim_request,
    unanswered_turn,
)
from processors.conversation_state import (
    Closed,
    ConversationState,
    Deliver,
    Dropped,
    HandOff,
    IssueLLM,
    PendingTurn,
    Refused,
    Transition,
)
from processors.preprocess import conversation_key, tenant_problem
from schemas.errors import DecodeError
from schemas.models import (
    ConversationEvent,
    ConversationEventKind,
    LLMRequest,
    LLMResponse,
    LLMStatus,
    utcnow,
)
from streams.agents.common import (
    RawMessage,
    dead_letter,
    encoded_size,
    internal_error,
    send_record,
)
from streams.agents.due import TICKS_PER_RUN, DueIndex
from streams.collector import freeze_long_lived
from streams.metrics import (
    CONVERSATIONS_ENDED,
    DROPPED,
    HISTORY_SHED,
    LLM_OUTCOMES,
    RECORDS_IN,
    REQUEST_CONTENT_CUT,
    REQUEST_HISTORY_TRIMMED,
    STAGE_ERRORS,
    child,
)
from streams.runtime import Runtime
from streams.settings import Settings
from streams.table import CHANGELOG_HEADROOM_BYTES, ChangelogTable, Encoded
from streams.transport import BatchConsumer, cooperate

__all__ = ["Batch", "DueIndex", "apply", "changelog_topic", "run_timer", "stage"]

log = logging.getLogger(__name__)
STAGE = "conversation"
STATE_STAGE = "conversation.state"
"""Dead-letter stage of an input whose new state would be too large for the changelog."""
VALIDATE_STAGE = "conversation.validate"
"""Dead-letter stage of a record written to the conversation topics that breaks the rules the
ingest stage applies (a tenant that could collide with another's keys, a blank event id)."""
QUEUE_STAGE = "conversation.queue"
"""Dead-letter stage of a user turn refused because the conversation's queue is full."""
REPLY_STAGE = "conversation.reply"
"""Dead-letter stage of an LLM response whose reply is too large for the delivery-requests
topic (the turn is answered with the persona's failure reply instead)."""


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
    unanswered = unanswered_turn(state, now, cfg)
    if unanswered is not None:
        return _give_up(rt, state, unanswered, now)
    reissued = reissue_due(state, now, cfg)
    timed = check_timeout(reissued.state, now, cfg)
    return Transition(timed.state, [*reissued.effects, *timed.effects])


def _give_up(rt: Runtime, state: ConversationState, turn: PendingTurn, now: datetime) -> Transition:
    """Answer ``turn`` as the LLM stage does when every engine failed (the persona's apology,
    or a handoff with ``llm.on_failure: handoff``): its last request
    (``conversation.max_llm_attempts``) got no response within its deadline. Counted in
    ``switchboard_llm_outcomes_total{engine="none",status="no_response"}``."""
    cfg = rt.config.conversation
    status, reply = failure_reply(rt.config.persona(turn.persona), rt.config.llm.on_failure)
    error = (
        f"no LLM response to the turn's {cfg.max_llm_attempts} request(s) within their deadlines"
    )
    child(LLM_OUTCOMES, turn.persona, "none", "no_response").inc()
    log.warning(
        "conversation %s: turn %s answered without the LLM: %s",
        state.conversation_id,
        turn.turn_id,
        error,
    )
    response = no_answer(state, turn, status, reply, error, now)
    return on_llm_response(state, response, cfg=cfg, now=now)


def _reply_too_large(
    rt: Runtime,
    before: ConversationState | None,
    record: ConversationEvent | LLMResponse,
    error: str,
    now: datetime,
) -> Transition | None:
    """For an LLM response that answers the pending turn but whose reply cannot be kept or
    sent (``error`` says why: the state too large for the changelog, the delivery request
    too large for its topic): the transition with the response's content replaced by the
    persona's failure reply (``processors.business_rules.failure_reply``, status ``failed``),
    its usage kept. None for any other input (it is only dead-lettered): without this the
    turn would stay pending and be asked of the LLM again at every deadline."""
    if not isinstance(record, LLMResponse) or before is None or before.pending is None:
        return None
    if before.pending.turn_id != record.turn_id:
        return None
    status, reply = failure_reply(
        rt.config.persona(record.persona), rt.config.llm.on_failure, LLMStatus.FAILED
    )
    substitute = record.model_copy(update={"status": status, "content": reply, "error": error})
    return on_llm_response(before, substitute, cfg=rt.config.conversation, now=now)


class _ReplyTooLarge(Exception):
    """The first effect of an LLM response's transition, its Deliver, is over the
    delivery-requests topic's limit (``size`` and ``limit`` in bytes); nothing was sent.
    ``too_large`` is the producer's error."""

    def __init__(self, size: int, limit: int, too_large: MessageSizeTooLargeError) -> None:
        super().__init__(f"{size} bytes over {limit}")
        self.size = size
        self.limit = limit
        self.too_large = too_large


def _decode(rt: Runtime, message: RawMessage) -> ConversationEvent | LLMResponse:
    data = message.value if isinstance(message.value, bytes) else b""
    record = rt.codec.decode_any(data)
    if not isinstance(record, ConversationEvent | LLMResponse):
        raise DecodeError(
            f"unexpected record {type(record).__name__} on {message.topic}",
            error_type="ValidationError",
        )
    return record


def _invalid(rt: Runtime, record: ConversationEvent | LLMResponse) -> tuple[str, str] | None:
    """``(reason, error_type)`` for a record the ingest stage would not have let through: the
    conversation topics are public, and a tenant with ``/`` would share another tenant's
    conversation key (``processors.preprocess.tenant_problem``); a blank event id would be
    dropped as a duplicate of every other blank one."""
    problem = tenant_problem(record.tenant, rt.config.preprocess.max_tenant_chars)
    if problem is not None:
        return problem, "InvalidTenant"
    if isinstance(record, ConversationEvent) and (not record.event_id or record.event_id.isspace()):
        return f"event_id {record.event_id!r} is blank (the idempotency key)", "MissingEventId"
    return None


class Batch:
    """States changed by a batch of inputs, staged until the whole batch was handled.

    ``commit`` stores them in the table when every record went through, so a batch retried
    after a transient error starts again from the table. The table sends their changelog
    records only after every record the batch produced was acknowledged: a worker killed in
    between would otherwise restore a state that says "answered" for a reply that was never
    sent, and drop the replayed response as a duplicate. Replaying the inputs re-creates the
    same records with the same ids, which the next stages drop. A state staged as None (pruned)
    is deleted the same way: its tombstone follows the batch's acknowledgements. A state staged
    with its changelog bytes is stored with them (``Encoded``), not encoded again.
    """

    def __init__(self, table: ChangelogTable[ConversationState], index: DueIndex | None = None):
        self.table = table
        self.index = index
        self.states: dict[bytes, tuple[int, ConversationState | None]] = {}
        self.encoded: dict[bytes, bytes] = {}
        """Changelog bytes of staged states, by key (absent: the table encodes the state)."""
        self.changed: set[bytes] = set()

    def get(self, partition: int, key: bytes) -> ConversationState | None:
        """The state as of the inputs applied so far (staged, else stored)."""
        if key in self.states:
            return self.states[key][1]
        state = self.table.get(partition, key)
        self.states[key] = (partition, state)
        return state

    def commit(self) -> None:
        """Store the changed states and delete the pruned ones (the changelog records and
        tombstones follow the batch's acknowledgements)."""
        changes: list[tuple[int, bytes, ConversationState | Encoded[ConversationState] | None]]
        changes = []
        for key in self.changed:
            partition, state = self.states[key]
            data = self.encoded.get(key)
            if state is None or data is None:
                changes.append((partition, key, state))
            else:
                changes.append((partition, key, Encoded(state, data)))
            if self.index is not None:
                self.index.update(key, state)
        self.table.put_many(changes)

    def stage(
        self,
        partition: int,
        key: bytes,
        state: ConversationState | None,
        encoded: bytes | None = None,
    ) -> None:
        """Record the new state of ``key``, or None to delete it (applied by ``commit``);
        ``encoded``: the state's changelog bytes (``_encode_state``), when already made."""
        self.states[key] = (partition, state)
        self.changed.add(key)
        if encoded is None:
            self.encoded.pop(key, None)
        else:
            self.encoded[key] = encoded


async def _handle(rt: Runtime, topics: dict[str, str], batch: Batch, message: RawMessage) -> None:
    child(RECORDS_IN, STAGE).inc()
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
    problem = _invalid(rt, record)
    if problem is not None:
        reason, error_type = problem
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage=VALIDATE_STAGE,
            reason=reason,
            error_type=error_type,
        )
        return
    key = conversation_key(record.tenant, record.conversation_id).encode()
    before = batch.get(message.partition, key)
    now = utcnow()
    is_tick = isinstance(record, ConversationEvent) and record.kind == ConversationEventKind.TIMEOUT
    if is_tick and before is not None and prune_due(before, now, rt.config.conversation):
        _prune(batch, message.partition, key, record.conversation_id)
        return
    transition = apply(rt, before, record, now)
    if transition is None:
        return
    if is_tick and not transition.effects and transition.state == before:
        return  # a tick that found nothing due: no changelog write
    state = transition.state
    changed = state is not before  # else stored or staged already: no write
    replaced_for_state: tuple[int, int] | None = None  # (size, limit) once the apology is sent
    if changed:  # measured before anything is sent; the table writes these bytes
        limit = batch.table.max_value_bytes(key)
        fitting = _fitting(state, limit, before)
        if isinstance(fitting, int):
            size = fitting
            error = (
                f"the reply made the conversation's state {size} bytes, too large for the "
                "changelog; the persona's failure reply was sent instead"
            )
            instead = _reply_too_large(rt, before, record, error, now)
            if instead is not None:  # the failure reply fits once old history is shed
                fitting = _fitting(instead.state, limit, before)
            if instead is None or isinstance(fitting, int):
                await _state_too_large(rt, topics, message, record, size, limit)
                return
            transition, replaced_for_state = instead, (size, limit)
        state, encoded = fitting
    try:
        await _send_effects(rt, topics, message, record, transition, state, key)
    except _ReplyTooLarge as exc:
        if replaced_for_state is not None:  # the failure reply itself: nothing else to send
            raise exc.too_large from None
        error = (
            f"the reply's delivery request was {exc.size} bytes, over the {exc.limit}-byte "
            f"max.message.bytes of {topics['delivery_requests']}; the persona's failure reply "
            "was sent instead"
        )
        instead = _reply_too_large(rt, before, record, error, now)
        if instead is None:
            raise exc.too_large from None
        fitting = _fitting(instead.state, batch.table.max_value_bytes(key), before)
        if isinstance(fitting, int):
            raise exc.too_large from None
        transition, changed = instead, True
        state, encoded = fitting
        try:
            await _send_effects(rt, topics, message, record, transition, state, key)
        except _ReplyTooLarge as again:  # the failure reply too: the input is dead-lettered
            raise again.too_large from None
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage=REPLY_STAGE,
            reason=error,
            error_type="ReplyTooLarge",
            message_id=record.turn_id if isinstance(record, LLMResponse) else None,
            tenant=record.tenant,
        )
        child(STAGE_ERRORS, STAGE, "ReplyTooLarge").inc()
    if replaced_for_state is not None:  # said only now that the failure reply was sent
        size, limit = replaced_for_state
        await _state_too_large(rt, topics, message, record, size, limit, replaced=True)
    if changed:
        batch.stage(message.partition, key, state, encoded)


async def _send_effects(
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    record: ConversationEvent | LLMResponse,
    transition: Transition,
    state: ConversationState,
    key: bytes,
) -> None:
    """Send the records of ``transition``'s effects, in order.

    Raises:
        _ReplyTooLarge: The first effect of an LLM response's transition is a Deliver over
            the delivery-requests topic's ``max.message.bytes`` (nothing was sent).
    """
    for position, effect in enumerate(transition.effects):
        if isinstance(effect, IssueLLM):
            await _send_request(rt, topics["llm_requests"], effect.request, key, message)
        elif isinstance(effect, Deliver):
            try:
                await send_record(
                    rt,
                    topics["delivery_requests"],
                    effect.request,
                    key=effect.request.recipient,
                    stage=STAGE,
                    parent=message,
                )
            except MessageSizeTooLargeError as exc:
                if position or not isinstance(record, LLMResponse):
                    raise
                recipient = effect.request.recipient.encode()
                size = encoded_size(rt, effect.request, key=recipient)
                limit = rt.producer.limit(topics["delivery_requests"])
                raise _ReplyTooLarge(size, limit, exc) from exc
        elif isinstance(effect, Dropped):
            child(DROPPED, STAGE, effect.reason).inc()
            log.debug("dropped %s: %s", effect.event_id, effect.reason)
        elif isinstance(effect, HandOff):
            log.info("conversation %s: turn handed to a human", record.conversation_id)
            await send_record(
                rt, topics["handoff"], effect.event, key=key, stage=STAGE, parent=message
            )
        elif isinstance(effect, Refused):
            await dead_letter(
                rt,
                topics["deadletter"],
                message,
                stage=QUEUE_STAGE,
                reason=effect.reason,
                error_type=effect.error_type,
                message_id=effect.event_id,
                tenant=record.tenant,
            )
        elif isinstance(effect, Closed):
            log.info("conversation %s ended: %s", record.conversation_id, effect.reason)
            summary = summarize(effect.ended or state, effect.reason, utcnow())
            child(CONVERSATIONS_ENDED, summary.status).inc()
            await send_record(
                rt, topics["analytics"], summary, key=key, stage=STAGE, parent=message
            )


async def _send_request(
    rt: Runtime, topic: str, request: LLMRequest, key: bytes, parent: RawMessage
) -> None:
    """Send ``request`` on the LLM-requests topic, made smaller (``trim_request``: oldest
    messages left out, else the end of the last one cut) when it is over the topic's
    ``max.message.bytes``.

    Raises:
        MessageSizeTooLargeError: The request's other fields alone are over the limit (the
            caller dead-letters the input).
    """
    try:
        await send_record(rt, topic, request, key=key, stage=STAGE, parent=parent)
        return
    except MessageSizeTooLargeError:
        limit = rt.producer.limit(topic)
        size = encoded_size(rt, request, key=key)
        trimmed = trim_request(request, size - limit) if size > limit else None
        if trimmed is None:
            raise
    await send_record(rt, topic, trimmed.request, key=key, stage=STAGE, parent=parent)
    REQUEST_HISTORY_TRIMMED.inc(trimmed.dropped)
    if trimmed.cut_bytes:
        REQUEST_CONTENT_CUT.inc()
    log.debug(  # the counters say how often; the worker warned of the topic at start-up
        "conversation %s: request %s was %d bytes, over the %d-byte max.message.bytes of %s: "
        "sent without its %d oldest message(s) and %d bytes cut from the end of the last",
        request.conversation_id,
        request.request_id,
        size,
        limit,
        topic,
        trimmed.dropped,
        trimmed.cut_bytes,
    )


def _fitting(
    state: ConversationState, limit: int, before: ConversationState | None
) -> tuple[ConversationState, bytes] | int:
    """``state`` and its changelog bytes, with old history shed when over ``limit`` bytes
    (``_fit``); the encoded size (bytes) when it cannot be made to fit."""
    encoded = _encode_state(state)
    if len(encoded) <= limit:
        return state, encoded
    fitted = _fit(state, encoded, limit, before)
    return len(encoded) if fitted is None else fitted


def _fit(
    state: ConversationState, encoded: bytes, limit: int, before: ConversationState | None
) -> tuple[ConversationState, bytes] | None:
    """Shed the oldest history turns of a state ``encoded`` over ``limit`` bytes
    (``processors.conversation.shed_history``), keeping the turns the input added to the
    history of ``before``; None when that is not enough.
    """
    older = {turn.turn_id for turn in before.history} if before is not None else set()
    added = sum(1 for turn in state.history if turn.turn_id not in older)
    shed = shed_history(state, len(encoded) - limit, keep_newest=added)
    if shed is None:
        return None
    smaller, dropped = shed
    data = _encode_state(smaller)
    if len(data) > limit:  # cannot happen: shed_history counts the bytes exactly
        return None
    HISTORY_SHED.inc(dropped)
    log.info(
        "conversation %s: %d oldest history turn(s) dropped to fit its state (%d bytes) in "
        "one changelog record (limit %d bytes)",
        state.conversation_id,
        dropped,
        len(encoded),
        limit,
    )
    return smaller, data


async def _state_too_large(
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    record: ConversationEvent | LLMResponse,
    size: int,
    limit: int,
    *,
    replaced: bool = False,
) -> None:
    """Dead-letter an input whose new state (``size`` bytes encoded) exceeds ``limit``: it is
    not applied (the caller keeps the old state and sends none of its effects), or with
    ``replaced`` an LLM response whose reply the caller replaces by the failure reply."""
    child(STAGE_ERRORS, STAGE, "StateTooLarge").inc()
    outcome = (
        "the turn was answered with the persona's failure reply instead"
        if replaced
        else "the input was not applied: the conversation keeps its state and none of the "
        "input's records were sent"
    )
    reason = (
        f"the conversation's new state would be {size} bytes in the changelog, over the limit "
        f"of {limit} bytes (the largest record the changelog takes less the key and "
        f"{CHANGELOG_HEADROOM_BYTES} bytes of headroom); {outcome}"
    )
    message_id = record.event_id if isinstance(record, ConversationEvent) else record.turn_id
    await dead_letter(
        rt,
        topics["deadletter"],
        message,
        stage=STATE_STAGE,
        reason=reason,
        error_type="StateTooLarge",
        message_id=message_id,
        tenant=record.tenant,
    )


def _prune(batch: Batch, partition: int, key: bytes, conversation_id: str) -> None:
    """Delete the state of a conversation ended longer than ``ended_retention_s`` ago."""
    batch.stage(partition, key, None)  # a tombstone once the batch's outputs are acknowledged
    child(DROPPED, STAGE, "pruned").inc()
    log.debug("pruned conversation %s", conversation_id)


def changelog_topic(settings: Settings) -> str:
    """The conversation table's changelog topic (compacted, partitioned like the inputs)."""
    return f"{settings.app_id}-conversations-changelog"


def _decode_state(data: bytes) -> ConversationState:
    return ConversationState.model_validate_json(data)


def _encode_state(state: ConversationState) -> bytes:
    return state.model_dump_json().encode()


TIMER_STAGE = "conversation.timer"
"""Stage label of the timer's ticks and of its failures in ``switchboard_stage_errors_total``."""


async def run_timer(tick_round: Callable[[], Awaitable[None]], interval: float) -> None:
    """Run ``tick_round`` every ``interval`` seconds, forever.

    A round that fails (the producer's buffer full for ``request_timeout_ms`` while the broker
    is away, a registry outage, a bug) is counted in
    ``switchboard_stage_errors_total{stage="conversation.timer",error_type}`` and logged, and the
    next round goes on: the ticks it did not send are due again ``interval`` later
    (``DueIndex.take_due``'s ``retry_s``). The timer used to end there, and the worker with it.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            await tick_round()
        except Exception as exc:
            child(STAGE_ERRORS, TIMER_STAGE, type(exc).__name__).inc()
            log.warning("timer round failed; the ticks are sent again later: %r", exc, exc_info=exc)


def _tick_acknowledged(ack: asyncio.Future[Any]) -> None:
    """Count and log a tick the broker did not acknowledge (it is due again later)."""
    if ack.cancelled():
        return
    exc = ack.exception()
    if exc is not None:
        child(STAGE_ERRORS, TIMER_STAGE, type(exc).__name__).inc()
        log.warning("a timer tick was not acknowledged; it is sent again later: %r", exc)


def stage(
    rt: Runtime, topics: dict[str, str]
) -> tuple[BatchConsumer, Callable[[], Coroutine[Any, Any, None]]]:
    """The conversation stage and its deadline/timeout timer.

    Returns:
        ``(consumer, timer)``: the consumer of the conversations and LLM responses topics
        (co-partitioned with the table's changelog), and the coroutine function that sends
        ``timeout`` ticks for conversations that are due, forever.
    """
    cfg = rt.config.conversation
    interval = max(
        0.5,
        min(cfg.llm_deadline_s / 4, cfg.inactivity_timeout_s / 4, cfg.ended_retention_s / 4, 30.0),
    )
    index = DueIndex(cfg, rescan_s=max(10 * interval, 30.0))
    table: ChangelogTable[ConversationState] = ChangelogTable(
        rt.settings,
        rt.producer,
        changelog_topic(rt.settings),
        encode=_encode_state,
        decode=_decode_state,
    )
    conversations = topics["conversations"]
    frozen = False  # once a restore's states were frozen (``streams.collector``)

    async def handle(messages: list[RawMessage]) -> None:
        batch = Batch(table, index)  # a retried batch starts again from the table
        for position, message in enumerate(messages):
            await cooperate(position)
            try:
                await _handle(rt, topics, batch, message)
            except Exception as exc:  # a bad record must never stop the partition
                await internal_error(rt, topics, message, exc, stage=STAGE)
        batch.commit()

    async def assigned(tps: set[TopicPartition]) -> None:
        """The consumer's ``on_assigned`` hook: restore the table's partitions of ``tps``.

        Runs beside the stage (its partitions paused meanwhile) and is cancelled when they
        are revoked before it finished; the table then keeps what it held before the restore
        (less what was dropped here), which the next assignment catches up or drops.
        """
        nonlocal frozen
        mine = {tp.partition for tp in tps if tp.topic == conversations}
        # Eager rebalances revoke everything first; what comes back to this worker is kept and
        # only caught up (another worker may have owned it in between), the rest restored.
        table.drop(table.partitions() - mine)
        try:
            if await table.restore(mine) and not frozen:
                freeze_long_lived()  # the restored states: out of every full collection
                frozen = True  # once per worker: see freeze_long_lived
        finally:  # also when cancelled: the dropped partitions must leave the timer's index
            index.invalidate()

    async def tick_round() -> None:
        await index.rescan(table, utcnow())  # yields to the loop while it scans
        now = utcnow()
        due = index.take_due(now, retry_s=interval, limit=TICKS_PER_RUN)
        for number, (key, tenant, conversation_id) in enumerate(due):
            await cooperate(number)
            tick = ConversationEvent(
                event_id=f"tick:{uuid.uuid4()}",
                conversation_id=conversation_id,
                tenant=tenant,
                kind=ConversationEventKind.TIMEOUT,
                origin_created_at=now,
                created_at=now,
            )
            ack = await send_record(rt, conversations, tick, key=key, stage=TIMER_STAGE)
            if isinstance(ack, asyncio.Future):
                ack.add_done_callback(_tick_acknowledged)

    async def ticks() -> None:
        await run_timer(tick_round, interval)

    consumer = BatchConsumer(
        rt.settings,
        STAGE,
        [conversations, topics["llm_responses"]],
        handle,
        on_assigned=assigned,
    )
    return consumer, ticks
