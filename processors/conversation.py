"""The conversation state machine: per-conversation order and exactly one reply per user turn.

The conversation stage keeps one :class:`ConversationState` per ``conversation_id`` in a
changelog-backed table (``streams.table``, JSON in the changelog) and, for every record it
consumes, calls
one pure function of this module, stores the returned state and sends the returned effects.
Nothing here does I/O or reads the clock, and no function mutates the state it is given.

Guarantees (ARCHITECTURE.md principles 4 and 5):

* **Idempotent.** Delivery is at-least-once, so every input may arrive twice. An event whose
  ``event_id`` is pending, queued, answered (last :data:`ANSWERED_IDS_LIMIT`) or among the last
  :data:`RECENT_IDS_LIMIT` ids seen is :class:`Dropped`; so is an LLM response whose ``turn_id``
  is not the pending turn. A response to an earlier *attempt* of the pending turn is accepted:
  the first response wins, later ones are dropped.
* **One turn in flight.** At most one user turn per conversation is pending at the LLM; later
  turns wait in ``queue`` and are issued one at a time as replies arrive, so replies go out in
  the order the user turns arrived. ``history`` holds the turns in answer order.
* **Deadlines.** :func:`reissue_due` re-issues a pending turn after ``llm_deadline_s`` with
  ``attempt + 1`` (a new ``request_id``, the same ``turn_id``), up to ``max_llm_attempts``
  requests; after the last one's deadline :func:`unanswered_turn` names the turn, and the
  stage answers it itself (:func:`no_answer`, then :func:`on_llm_response`).

Lifecycle choices:

* ``open`` until the first reply, then ``active``. A user turn for a ``closed`` or ``timed_out``
  conversation starts a fresh session: history, persona and status are reset, while the dedup
  ids, the lifetime counters and ``created_at`` are kept (``sessions`` counts sessions,
  ``opened_at`` is when the current one started). A session idle for ``inactivity_timeout_s``
  with nothing pending is timed out lazily by the next user turn (a ``Closed("timeout")`` effect
  precedes the new turn's ``IssueLLM``) or by :func:`check_timeout`.
* A ``close`` or ``handoff`` event takes effect once the conversation is idle: every turn already
  accepted (the pending one, the queue, and turns arriving while it drains) is still answered in
  order, then the status changes and :class:`Closed` follows the last ``Deliver``.
* In ``handoff`` a human owns the conversation: user turns are recorded in history for the
  operator but not sent to the LLM (``Dropped(reason="handoff")``) until the conversation is
  closed or times out (the timer times it out like an open session, :func:`next_due_at`).
* An ended conversation (``closed`` or ``timed_out``) is kept ``ended_retention_s`` after it
  ended (:func:`prune_at`): meanwhile a redelivered input is still dropped by id, a late LLM
  response as ``duplicate``/``stale``, and a new user turn opens its next session. Then the
  timer's tick finds :func:`prune_due` true and the agent deletes the state (a tombstone in the
  changelog); an input arriving later is treated as for a conversation never seen. The
  placeholder stored for an input about an unknown conversation is a closed state and is
  pruned the same way.
* An LLM response is delivered whatever its ``status`` (the llm stage fills ``failed``
  responses with the persona's apology); one with empty content ends the turn without a
  delivery and yields ``Dropped(reason="empty_reply")`` so that the agent counts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

from processors.config import ConversationConfig, PersonaConfig
from processors.conversation_state import (
    ANSWERED_IDS_LIMIT,
    ENDED,
    ONGOING,
    RECENT_IDS_LIMIT,
    Closed,
    ConversationState,
    ConversationStatus,
    Deliver,
    Dropped,
    Effect,
    HandOff,
    IssueLLM,
    PendingTurn,
    Refused,
    Transition,
    Turn,
)
from processors.ids import scoped_id
from schemas.codec import avro_long_bytes
from schemas.models import (
    ChatMessage,
    ConversationEvent,
    ConversationEventKind,
    ConversationSummary,
    DeliveryRequest,
    LLMRequest,
    LLMResponse,
    LLMStatus,
    MessageType,
    Role,
)

__all__ = [
    "TrimmedRequest",
    "check_timeout",
    "deadline_s",
    "ended_at",
    "next_due_at",
    "no_answer",
    "on_close",
    "on_llm_response",
    "on_user_turn",
    "prune_at",
    "prune_due",
    "reissue_due",
    "shed_history",
    "summarize",
    "trim_request",
    "unanswered_turn",
]


def _bounded(items: list[str], item: str, limit: int) -> list[str]:
    return [*items, item][-limit:]


def _ms(moment: datetime) -> datetime:
    """Truncate to milliseconds, the precision of Avro ``timestamp-millis``."""
    return moment.replace(microsecond=(moment.microsecond // 1000) * 1000)


def _is_idle(state: ConversationState) -> bool:
    return state.pending is None and not state.queue


def _idle_too_long(state: ConversationState, now: datetime, cfg: ConversationConfig) -> bool:
    idle_s = (now - state.last_activity_at).total_seconds()
    return _is_idle(state) and idle_s >= cfg.inactivity_timeout_s


def _new_state(event: ConversationEvent, persona: str, now: datetime) -> ConversationState:
    return ConversationState(
        conversation_id=event.conversation_id,
        tenant=event.tenant,
        persona=persona,
        created_at=now,
        opened_at=now,
        last_activity_at=now,
    )


def _placeholder(
    conversation_id: str, tenant: str, persona: str, now: datetime
) -> ConversationState:
    """The state returned for an input about an unknown conversation: closed, zero sessions.

    It exists because a transition always carries a state; it records no event id, so it makes
    no later input a duplicate. Storing it is harmless: the next user turn opens session 1 as
    for a new conversation (keeping the placeholder's ``created_at``), a replayed command is
    ``not_open`` again, a second response for it is ``stale``. Like any closed state it is
    pruned ``ended_retention_s`` after it was stored (:func:`prune_at`).
    """
    return ConversationState(
        conversation_id=conversation_id,
        tenant=tenant,
        persona=persona,
        status=ConversationStatus.CLOSED,
        sessions=0,
        created_at=now,
        opened_at=now,
        last_activity_at=now,
    )


def _reopen(state: ConversationState, persona: str, now: datetime) -> ConversationState:
    return state.model_copy(
        update={
            "status": ConversationStatus.OPEN,
            "persona": persona,
            "history": [],
            "closing": None,
            "close_reason": None,
            "sessions": state.sessions + 1,
            "opened_at": now,
        }
    )


def _is_duplicate(state: ConversationState, event_id: str) -> bool:
    in_flight = [state.pending] if state.pending is not None else []
    return (
        event_id in state.recent_ids
        or event_id in state.answered_ids
        or any(turn.turn_id == event_id for turn in (*in_flight, *state.queue))
    )


def _with_history(state: ConversationState, turn: Turn, cfg: ConversationConfig) -> list[Turn]:
    return [*state.history, turn][-cfg.max_history_turns :]


def shed_history(
    state: ConversationState, excess_bytes: int, *, keep_newest: int = 0
) -> tuple[ConversationState, int] | None:
    """Drop the oldest history turns until the state's JSON is ``excess_bytes`` shorter.

    The conversation stage calls this when a new state would be ``excess_bytes`` (bytes, > 0)
    over what one changelog record may hold. The history is only context for the LLM, which
    trims it to a token budget anyway, so the oldest turns go first; the turn in flight, the
    queue, the dedup ids and the counters stay. Without this a conversation whose state came
    near the limit would refuse every later input, its LLM responses included, and re-issue
    its pending turn at every deadline.

    The bytes freed are exact for ``model_dump_json`` output: each turn's JSON, plus the comma
    that separated it from the next one.

    Args:
        state: The new state, ``excess_bytes`` too large.
        excess_bytes: Bytes to free.
        keep_newest: Turns at the end of the history that must stay (the caller keeps the
            turns its input added: an input too large on its own is refused, not stored
            without its own turn).

    Returns:
        ``(state, turns_dropped)``, or None when dropping every turn it may drop frees fewer
        than ``excess_bytes`` (the caller must then refuse the input).
    """
    freed = 0
    history = state.history
    for count, turn in enumerate(history[: max(len(history) - keep_newest, 0)], start=1):
        freed += len(turn.model_dump_json().encode()) + (count < len(history))
        if freed >= excess_bytes:
            return state.model_copy(update={"history": history[count:]}), count
    return None


def _chat_message_bytes(message: ChatMessage) -> int:
    """Avro bytes of one ``ChatMessage``: the role's enum index (an int, one byte for the
    first 64 symbols) and the content (a long length, then its UTF-8 bytes)."""
    content = len(message.content.encode())
    return 1 + avro_long_bytes(content) + content


class TrimmedRequest(NamedTuple):
    """A request made smaller by :func:`trim_request`."""

    request: LLMRequest
    dropped: int
    """Oldest messages left out."""
    cut_bytes: int
    """UTF-8 bytes cut from the end of the last message (0 when it is whole)."""


def trim_request(request: LLMRequest, excess_bytes: int) -> TrimmedRequest | None:
    """Make the Avro body of ``request`` at least ``excess_bytes`` shorter.

    The conversation stage calls this when the request is ``excess_bytes`` (bytes, > 0) over
    the ``max.message.bytes`` of the LLM-requests topic, which may be lower than the
    changelog's: the conversation's state keeps its whole history and the user's whole
    message, only this request carries less. The oldest messages go first, as the engine's
    token budget would drop them. When the last message, the user turn to answer, is still
    too large alone, its end is cut (at a character boundary): the turn is answered from
    the start of the message rather than not at all.

    The bytes freed are a lower bound: each dropped message's Avro bytes (``ChatMessage``),
    or the bytes cut from a string, while the array's block count and the string's length
    prefix can only get shorter (Avro 1.11 specification, "Binary Encoding").

    The bound is at most a few bytes short of the exact saving (the shorter length prefixes
    of the record and its value are not counted), so a request within those bytes of fitting
    with an empty last message gets None.

    Returns:
        The smaller request, or None when even an empty last message would not free enough
        (the request's other fields are too large), or the request has no message.

    Raises:
        ValueError: ``excess_bytes`` is not positive.
    """
    if excess_bytes <= 0:
        raise ValueError(f"excess_bytes must be > 0, not {excess_bytes}")
    messages = request.messages
    if not messages:
        return None
    freed = 0
    for count, message in enumerate(messages[:-1], start=1):
        freed += _chat_message_bytes(message)
        if freed >= excess_bytes:
            return TrimmedRequest(
                request.model_copy(update={"messages": messages[count:]}), count, 0
            )
    last = messages[-1]
    content = last.content.encode()
    need = excess_bytes - freed
    if need > len(content) + avro_long_bytes(len(content)) - avro_long_bytes(0):
        return None
    kept = content[: max(len(content) - need, 0)].decode(errors="ignore")  # split chars go
    cut = last.model_copy(update={"content": kept})
    return TrimmedRequest(
        request.model_copy(update={"messages": [cut]}),
        len(messages) - 1,
        len(content) - len(kept.encode()),
    )


def _request(state: ConversationState, turn: PendingTurn, cfg: ConversationConfig) -> LLMRequest:
    """Build the LLMRequest of the pending ``turn``; the history ends with its user turn."""
    if turn.issued_at is None:
        raise ValueError(f"turn {turn.turn_id!r} has not been issued")
    messages = [ChatMessage(role=t.role, content=t.content) for t in state.history]
    if not state.history or state.history[-1].turn_id != turn.turn_id:
        messages.append(ChatMessage(role=Role.USER, content=turn.content))
    return LLMRequest(
        request_id=f"{turn.turn_id}:{turn.attempt}",
        conversation_id=state.conversation_id,
        tenant=state.tenant,
        turn_id=turn.turn_id,
        persona=turn.persona,
        attempt=turn.attempt,
        messages=messages,
        metadata=dict(turn.metadata),
        created_at=_ms(turn.issued_at),
        deadline_at=_ms(turn.issued_at + timedelta(seconds=deadline_s(turn.attempt, cfg))),
    )


def _issue(
    state: ConversationState, turn: PendingTurn, cfg: ConversationConfig, now: datetime
) -> tuple[ConversationState, IssueLLM]:
    """Make ``turn`` the pending one, append it to the history and build its IssueLLM."""
    issued = turn.model_copy(update={"attempt": 0, "issued_at": now})
    user_turn = Turn(
        turn_id=turn.turn_id, role=Role.USER, content=turn.content, at=now, persona=turn.persona
    )
    state = state.model_copy(
        update={"pending": issued, "history": _with_history(state, user_turn, cfg)}
    )
    return state, IssueLLM(_request(state, issued, cfg))


def _pending_from(event: ConversationEvent, persona: str) -> PendingTurn:
    return PendingTurn(
        turn_id=event.event_id,
        content=event.content,
        channel=event.channel,
        sender=event.sender,
        subject=event.subject,
        priority=event.priority,
        metadata=dict(event.metadata),
        origin_created_at=event.origin_created_at,
        persona=persona,
    )


def _choose_persona(
    state: ConversationState,
    persona: str,
    *,
    override_continuity: bool,
    continuity: bool,
    personas: Mapping[str, PersonaConfig],
) -> str:
    keep = continuity and not override_continuity and state.status in ONGOING
    chosen = state.persona if keep and state.persona in personas else persona
    if chosen not in personas:
        raise ValueError(f"unknown persona {chosen!r} (known: {sorted(personas)})")
    return chosen


def on_user_turn(
    state: ConversationState | None,
    event: ConversationEvent,
    *,
    persona: str,
    override_continuity: bool,
    continuity: bool,
    cfg: ConversationConfig,
    personas: Mapping[str, PersonaConfig],
    now: datetime,
) -> Transition:
    """Accept a user turn: issue it to the LLM when nothing is pending, else queue it.

    Args:
        state: The stored state, or None for a conversation never seen.
        event: A ``turn`` event; its ``event_id`` is the turn id.
        persona: The persona the router chose for this turn.
        override_continuity: True when the routing rule replaces an ongoing persona.
        continuity: ``routing.continuity``: keep the persona of an ongoing (open/active) session.
        cfg: History bound, inactivity timeout (s) and LLM deadline (s).
        personas: Configured personas; a stored persona no longer configured is replaced.
        now: The current time (UTC).

    Returns:
        ``[Dropped]`` for a duplicate, a non-user turn or a turn during handoff;
        ``[Refused(error_type="QueueFull")]`` (state unchanged) when ``cfg.max_queued_turns``
        turns already wait behind the one in flight; otherwise ``[IssueLLM]`` or ``[]``
        (queued), preceded by ``Closed("timeout")`` when the session had been idle for
        ``cfg.inactivity_timeout_s``.

    Raises:
        ValueError: If the chosen persona is not in ``personas``.
    """
    if state is not None and _is_duplicate(state, event.event_id):
        return Transition(state, [Dropped(event.event_id, "duplicate")])
    if event.role is not Role.USER:
        stored = state or _placeholder(event.conversation_id, event.tenant, persona, now)
        return Transition(stored, [Dropped(event.event_id, "not_user_turn")])
    if state is not None and state.pending is not None and len(state.queue) >= cfg.max_queued_turns:
        reason = (
            f"conversation {state.conversation_id!r} already has {len(state.queue)} turns "
            f"waiting behind the one in flight (conversation.max_queued_turns)"
        )
        return Transition(state, [Refused(event.event_id, reason, "QueueFull")])
    effects: list[Effect] = []
    if state is not None and state.status not in ENDED and _idle_too_long(state, now, cfg):
        state = state.model_copy(update={"status": ConversationStatus.TIMED_OUT})
        effects.append(Closed("timeout", ended=state))
    if state is None:
        state = _new_state(event, persona, now)
    elif state.status in ENDED:
        state = _reopen(state, persona, now)
    state = state.model_copy(
        update={
            "recent_ids": _bounded(state.recent_ids, event.event_id, RECENT_IDS_LIMIT),
            "user_turns": state.user_turns + 1,
            "last_activity_at": now,
        }
    )
    if state.status is ConversationStatus.HANDOFF:
        turn = Turn(turn_id=event.event_id, role=Role.USER, content=event.content, at=now)
        state = state.model_copy(update={"history": _with_history(state, turn, cfg)})
        return Transition(state, [*effects, Dropped(event.event_id, "handoff")])
    chosen = _choose_persona(
        state,
        persona,
        override_continuity=override_continuity,
        continuity=continuity,
        personas=personas,
    )
    state = state.model_copy(update={"persona": chosen})
    waiting = _pending_from(event, chosen)
    if state.pending is not None:
        state = state.model_copy(update={"queue": [*state.queue, waiting]})
        return Transition(state, effects)
    state, issue = _issue(state, waiting, cfg, now)
    return Transition(state, [*effects, issue])


def _reply(state: ConversationState, turn: PendingTurn, content: str, now: datetime) -> Deliver:
    subject = turn.subject
    if subject and not subject.lower().startswith("re:"):
        subject = f"Re: {subject}"
    return Deliver(
        DeliveryRequest(
            delivery_id=scoped_id(f"{turn.turn_id}:reply", state.tenant, state.conversation_id),
            message_id=turn.turn_id,
            conversation_id=state.conversation_id,
            tenant=state.tenant,
            channel=turn.channel,
            recipient=turn.sender,
            subject=subject,
            content=content,
            message_type=MessageType.CHAT,
            priority=turn.priority,
            persona=turn.persona,
            metadata=dict(turn.metadata),
            origin_created_at=turn.origin_created_at,
            created_at=_ms(now),
        )
    )


def _finish_close(state: ConversationState) -> tuple[ConversationState, list[Effect]]:
    """Apply a requested close/handoff once nothing is pending or queued."""
    if state.closing is None or not _is_idle(state):
        return state, []
    reason = state.close_reason or state.closing.value
    state = state.model_copy(
        update={"status": state.closing, "closing": None, "close_reason": None}
    )
    return state, [Closed(reason)]


def on_llm_response(
    state: ConversationState | None,
    response: LLMResponse,
    *,
    cfg: ConversationConfig,
    now: datetime,
) -> Transition:
    """Answer the pending turn with ``response`` and issue the next queued turn, if any.

    Args:
        state: The stored state (None if unknown).
        response: The LLM stage's answer; any ``status`` is delivered when content is non-empty.
        cfg: History bound and LLM deadline (s) of the next request.
        now: The current time (UTC); reply latency = ``now - origin_created_at`` in ms.

    An ``escalated`` response (a business-rule trigger, or ``llm.on_failure: handoff``) also
    emits ``HandOff`` with the turn for the humans' handoff topic and hands the conversation
    off once idle, unless the user already asked to close it (the close wins). Only the
    response that wins the turn does this: an escalation of an attempt that lost to a
    re-issued one is dropped like any stale response.

    Returns:
        ``[Dropped]`` for an unknown conversation or a stale/duplicate response; otherwise
        ``[Deliver]`` (or ``[Dropped("empty_reply")]``), ``HandOff`` when escalated, then
        ``IssueLLM`` for the next queued turn or ``Closed`` when a requested close/handoff can
        now take effect.
    """
    if state is None:
        unknown = _placeholder(response.conversation_id, response.tenant, response.persona, now)
        return Transition(unknown, [Dropped(response.request_id, "unknown_conversation")])
    pending = state.pending
    if pending is None or response.turn_id != pending.turn_id:
        reason = "duplicate" if response.turn_id in state.answered_ids else "stale"
        return Transition(state, [Dropped(response.request_id, reason)])
    effects: list[Effect] = []
    latency_ms = (now - pending.origin_created_at).total_seconds() * 1000.0
    update: dict[str, object] = {
        "pending": None,
        "answered_ids": _bounded(state.answered_ids, pending.turn_id, ANSWERED_IDS_LIMIT),
        "last_activity_at": now,
        "last_engine": response.engine,
        "prompt_tokens": state.prompt_tokens + response.prompt_tokens,
        "completion_tokens": state.completion_tokens + response.completion_tokens,
        "cost_usd": state.cost_usd + response.cost_usd,
    }
    if response.content:
        reply = Turn(
            turn_id=f"{pending.turn_id}:reply",
            role=Role.ASSISTANT,
            content=response.content,
            at=now,
            persona=pending.persona,
        )
        update |= {
            "history": _with_history(state, reply, cfg),
            "status": ConversationStatus.ACTIVE
            if state.status is ConversationStatus.OPEN
            else state.status,
            "assistant_turns": state.assistant_turns + 1,
            "fallback_replies": state.fallback_replies + (response.status is not LLMStatus.OK),
            "total_reply_latency_ms": state.total_reply_latency_ms + max(latency_ms, 0.0),
        }
        effects.append(_reply(state, pending, response.content, now))
    else:
        effects.append(Dropped(pending.turn_id, "empty_reply"))
    if response.status is LLMStatus.ESCALATED:
        reason = response.error or "escalated"
        effects.append(HandOff(_handoff_event(state, pending, reason, now)))
        if state.closing is not ConversationStatus.CLOSED:  # a close the user asked for wins
            update |= {"closing": ConversationStatus.HANDOFF, "close_reason": f"handoff: {reason}"}
    state = state.model_copy(update=update)
    if state.queue:
        next_turn, rest = state.queue[0], state.queue[1:]
        state, issue = _issue(state.model_copy(update={"queue": rest}), next_turn, cfg, now)
        return Transition(state, [*effects, issue])
    state, closed = _finish_close(state)
    return Transition(state, [*effects, *closed])


def _handoff_event(
    state: ConversationState, turn: PendingTurn, reason: str, now: datetime
) -> ConversationEvent:
    """The record for the humans' handoff topic: the escalated turn, and why."""
    return ConversationEvent(
        event_id=f"{turn.turn_id}:handoff",
        conversation_id=state.conversation_id,
        tenant=state.tenant,
        kind=ConversationEventKind.HANDOFF,
        content=turn.content,
        persona=turn.persona,
        channel=turn.channel,
        sender=turn.sender,
        subject=turn.subject,
        priority=turn.priority,
        metadata={**turn.metadata, "handoff.reason": reason},
        origin_created_at=turn.origin_created_at,
        created_at=_ms(now),
    )


def on_close(
    state: ConversationState | None, event: ConversationEvent, now: datetime
) -> Transition:
    """Close or hand off the conversation once every accepted turn has been answered.

    Args:
        state: The stored state (None if unknown).
        event: A ``close`` or ``handoff`` event; its content (or kind) is the reason.
        now: The current time (UTC).

    Returns:
        ``[Closed(reason)]`` when the conversation is idle, ``[]`` when the close waits for
        the pending/queued turns, ``[Dropped]`` for a duplicate or an ended conversation.

    Raises:
        ValueError: If ``event.kind`` is neither ``close`` nor ``handoff``.
    """
    targets = {
        ConversationEventKind.CLOSE: ConversationStatus.CLOSED,
        ConversationEventKind.HANDOFF: ConversationStatus.HANDOFF,
    }
    if event.kind not in targets:
        raise ValueError(f"on_close takes close/handoff events, got {event.kind.value!r}")
    target = targets[event.kind]
    if state is None:
        unknown = _placeholder(event.conversation_id, event.tenant, event.persona or "", now)
        return Transition(unknown, [Dropped(event.event_id, "not_open")])
    if _is_duplicate(state, event.event_id):
        return Transition(state, [Dropped(event.event_id, "duplicate")])
    if state.status in ENDED or state.status is target:
        return Transition(state, [Dropped(event.event_id, "not_open")])
    state = state.model_copy(
        update={
            "recent_ids": _bounded(state.recent_ids, event.event_id, RECENT_IDS_LIMIT),
            "closing": target,
            "close_reason": event.content or event.kind.value,
            "last_activity_at": now,
        }
    )
    state, effects = _finish_close(state)
    return Transition(state, effects)


def deadline_s(attempt: int, cfg: ConversationConfig) -> float:
    """Seconds a turn's attempt ``attempt`` may take before it is re-issued.

    ``llm_deadline_s`` doubled per earlier attempt, up to 16 times: a provider that is slow rather
    than gone gets more time with each re-issue instead of a growing pile of duplicate calls.
    """
    return cfg.llm_deadline_s * float(2 ** min(max(attempt, 0), 4))


def reissue_due(state: ConversationState, now: datetime, cfg: ConversationConfig) -> Transition:
    """Re-issue the pending turn when its LLM response is overdue.

    A turn issued more than ``deadline_s(attempt)`` seconds before ``now`` (``llm_deadline_s``
    for the first attempt, doubling after each re-issue) is issued again with
    ``attempt + 1`` (``request_id`` ``<turn_id>:<attempt>``); a late response to any attempt is
    still accepted by :func:`on_llm_response`, the first one wins.

    The last of ``cfg.max_llm_attempts`` requests is not re-issued: see
    :func:`unanswered_turn`.

    Returns:
        ``[IssueLLM]`` when re-issued, else ``[]`` with ``state`` unchanged.
    """
    pending = state.pending
    if pending is None or pending.issued_at is None:
        return Transition(state, [])
    if (now - pending.issued_at).total_seconds() <= deadline_s(pending.attempt, cfg):
        return Transition(state, [])
    if pending.attempt + 1 >= cfg.max_llm_attempts:
        return Transition(state, [])  # the last attempt: unanswered_turn gives up on it
    reissued = pending.model_copy(update={"attempt": pending.attempt + 1, "issued_at": now})
    state = state.model_copy(update={"pending": reissued, "reissues": state.reissues + 1})
    return Transition(state, [IssueLLM(_request(state, reissued, cfg))])


def unanswered_turn(
    state: ConversationState, now: datetime, cfg: ConversationConfig
) -> PendingTurn | None:
    """The pending turn when its last request (attempt ``cfg.max_llm_attempts - 1``) is past
    its deadline without a response, else None. The stage then answers it with
    :func:`no_answer`: a turn whose responses never come must not hold the conversation (and
    the turns queued behind it) for ever."""
    pending = state.pending
    if pending is None or pending.issued_at is None:
        return None
    if pending.attempt + 1 < cfg.max_llm_attempts:
        return None
    if (now - pending.issued_at).total_seconds() <= deadline_s(pending.attempt, cfg):
        return None
    return pending


def no_answer(
    state: ConversationState,
    turn: PendingTurn,
    status: LLMStatus,
    content: str,
    error: str,
    now: datetime,
) -> LLMResponse:
    """The response the conversation stage gives ``turn`` itself when no usable one came.

    Answers the turn's last request (``request_id`` ``<turn_id>:<attempt>``) from engine
    ``none`` with ``status`` and ``content`` (the persona's apology or handoff reply:
    ``processors.business_rules.failure_reply``); a later response of the LLM stage is then
    dropped as a duplicate, as for any answered turn. Apply it with :func:`on_llm_response`.
    """
    return LLMResponse(
        request_id=f"{turn.turn_id}:{turn.attempt}",
        conversation_id=state.conversation_id,
        tenant=state.tenant,
        turn_id=turn.turn_id,
        persona=turn.persona,
        status=status,
        content=content,
        engine="none",
        error=error,
        attempts=0,
        created_at=_ms(now),
    )


def summarize(state: ConversationState, reason: str, now: datetime) -> ConversationSummary:
    """The analytics record of a session that just ended (after a ``Closed`` effect).

    Counters are the conversation's lifetime totals; ``session`` says which session ended.
    """
    answered = max(state.assistant_turns, 1)
    return ConversationSummary(
        conversation_id=state.conversation_id,
        tenant=state.tenant,
        persona=state.persona,
        status=state.status.value,
        reason=reason,
        session=max(state.sessions, 1),
        user_turns=state.user_turns,
        assistant_turns=state.assistant_turns,
        fallback_replies=state.fallback_replies,
        reissues=state.reissues,
        avg_reply_latency_ms=round(state.total_reply_latency_ms / answered, 3),
        last_engine=state.last_engine,
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        cost_usd=round(state.cost_usd, 9),
        opened_at=_ms(state.opened_at),
        closed_at=_ms(now),
    )


def next_due_at(state: ConversationState, cfg: ConversationConfig) -> datetime | None:
    """When this conversation next needs a timer tick, or None if it never will by itself.

    The pending turn's LLM deadline (``issued_at + deadline_s(attempt)``); else for an ended
    conversation its :func:`prune_at`; else for an idle open, active or handed-off session its
    inactivity timeout (``last_activity_at + inactivity_timeout_s``). A tick at that time makes
    :func:`reissue_due` or :func:`check_timeout` act, or the agent prune (:func:`prune_due`).
    """
    pending = state.pending
    if pending is not None:
        if pending.issued_at is None:
            return None
        return pending.issued_at + timedelta(seconds=deadline_s(pending.attempt, cfg))
    if state.status in ENDED:
        return prune_at(state, cfg)
    if not state.queue:
        return state.last_activity_at + timedelta(seconds=cfg.inactivity_timeout_s)
    return None


def ended_at(state: ConversationState, cfg: ConversationConfig) -> datetime | None:
    """When the conversation's last session ended; None while it is open, active or handed off.

    A ``closed`` state ended at its ``last_activity_at`` (the close event, or the reply that let
    a requested close take effect; a placeholder: when it was stored). A ``timed_out`` one ended
    ``inactivity_timeout_s`` after its ``last_activity_at``, the earliest moment
    :func:`check_timeout` could end it.
    """
    if state.status not in ENDED or not _is_idle(state):
        return None
    if state.status == ConversationStatus.TIMED_OUT:
        return state.last_activity_at + timedelta(seconds=cfg.inactivity_timeout_s)
    return state.last_activity_at


def prune_at(state: ConversationState, cfg: ConversationConfig) -> datetime | None:
    """When an ended conversation may be forgotten: :func:`ended_at` + ``ended_retention_s``.

    None while the conversation is open, active or handed off (it must end first).
    """
    end = ended_at(state, cfg)
    return None if end is None else end + timedelta(seconds=cfg.ended_retention_s)


def prune_due(state: ConversationState, now: datetime, cfg: ConversationConfig) -> bool:
    """True when ``state`` ended ``ended_retention_s`` or more before ``now``: the agent deletes
    it from the table (a tombstone in the changelog) instead of storing a transition.

    Within the retention the state still recognises redelivered inputs by id; after it, the
    conversation id is treated as never seen.
    """
    due = prune_at(state, cfg)
    return due is not None and now >= due


def check_timeout(state: ConversationState, now: datetime, cfg: ConversationConfig) -> Transition:
    """Time out a session idle for ``cfg.inactivity_timeout_s`` with nothing pending or queued.

    Returns:
        ``[Closed("timeout")]`` with status ``timed_out``, else ``[]`` with ``state`` unchanged
        (already ended, busy, or active recently).
    """
    if state.status in ENDED or not _idle_too_long(state, now, cfg):
        return Transition(state, [])
    state = state.model_copy(update={"status": ConversationStatus.TIMED_OUT, "closing": None})
    return Transition(state, [Closed("timeout")])
