"""The conversation agent's stored state and the effects its state machine returns.

Shapes only (pydantic models and frozen dataclasses); the transitions that produce them are in
:mod:`processors.conversation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from schemas.models import (
    Channel,
    ConversationEvent,
    DeliveryRequest,
    LLMRequest,
    Priority,
    Role,
)

__all__ = [
    "ANSWERED_IDS_LIMIT",
    "ENDED",
    "ONGOING",
    "RECENT_IDS_LIMIT",
    "Closed",
    "ConversationState",
    "ConversationStatus",
    "Deliver",
    "Dropped",
    "Effect",
    "HandOff",
    "IssueLLM",
    "PendingTurn",
    "Refused",
    "Transition",
    "Turn",
]

RECENT_IDS_LIMIT = 256
"""Event ids remembered per conversation for dedup (oldest forgotten first)."""
ANSWERED_IDS_LIMIT = 256
"""Answered turn ids remembered per conversation (duplicate responses, late duplicate turns)."""


class ConversationStatus(StrEnum):
    """Lifecycle of a conversation session."""

    OPEN = "open"
    ACTIVE = "active"
    CLOSED = "closed"
    TIMED_OUT = "timed_out"
    HANDOFF = "handoff"


ONGOING = frozenset({ConversationStatus.OPEN, ConversationStatus.ACTIVE})
ENDED = frozenset({ConversationStatus.CLOSED, ConversationStatus.TIMED_OUT})


class Turn(BaseModel):
    """One turn of the history (``turn_id`` = the user event id, or ``<id>:reply``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    turn_id: str
    role: Role
    content: str
    at: datetime
    persona: str | None = None


class PendingTurn(BaseModel):
    """A user turn waiting for, or in flight to, the LLM: all the reply delivery needs.

    ``attempt`` and ``issued_at`` are set when the turn is issued (``issued_at`` is None while
    it waits in the queue).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    turn_id: str
    content: str
    channel: Channel
    sender: str
    subject: str | None = None
    priority: Priority = Priority.MEDIUM
    metadata: dict[str, str] = Field(default_factory=dict)
    origin_created_at: datetime
    persona: str
    attempt: int = 0
    issued_at: datetime | None = None


class ConversationState(BaseModel):
    """Everything the conversation agent keeps per ``conversation_id`` (JSON-serialisable).

    Invariant: ``queue`` is empty whenever ``pending`` is None.
    """

    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    tenant: str
    status: ConversationStatus = ConversationStatus.OPEN
    persona: str
    history: list[Turn] = Field(default_factory=list)
    pending: PendingTurn | None = None
    queue: list[PendingTurn] = Field(default_factory=list)
    recent_ids: list[str] = Field(default_factory=list)
    answered_ids: list[str] = Field(default_factory=list)
    closing: ConversationStatus | None = None  # requested close/handoff, applied once idle
    close_reason: str | None = None
    user_turns: int = 0
    assistant_turns: int = 0
    fallback_replies: int = 0
    reissues: int = 0
    sessions: int = 1
    created_at: datetime
    opened_at: datetime
    last_activity_at: datetime
    total_reply_latency_ms: float = 0.0
    last_engine: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class IssueLLM:
    """Send ``request`` to ``switchboard.llm.requests``."""

    request: LLMRequest


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``request`` to ``switchboard.delivery.requests``."""

    request: DeliveryRequest


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended (``reason``: the close event's content or kind, or ``timeout``).

    ``ended`` is the state the session ended in when the transition's own state is already a
    later one (a user turn that timed the idle session out and opened the next); None means
    the transition's state is the ended one.
    """

    reason: str
    ended: ConversationState | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """An input that produces no record: count it in a metric, send nothing.

    Reasons: ``duplicate``, ``stale`` (a response for a turn not pending), ``handoff``,
    ``not_user_turn``, ``not_open`` (close of an ended or unknown conversation),
    ``unknown_conversation`` (a response without state), ``empty_reply``.
    """

    event_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class HandOff:
    """Send ``event`` (kind ``handoff``) to the humans' handoff topic (``switchboard.handoff``).

    Emitted once per escalated turn, by the transition that accepts the turn's escalated LLM
    response: a losing attempt's escalation never reaches the humans.
    """

    event: ConversationEvent


@dataclass(frozen=True, slots=True)
class Refused:
    """An input the conversation cannot take: dead-letter it with ``reason`` (it is recorded,
    not answered). Reason so far: the queue of waiting turns is full."""

    event_id: str
    reason: str
    error_type: str


Effect = IssueLLM | Deliver | Closed | Dropped | HandOff | Refused


@dataclass(frozen=True, slots=True)
class Transition:
    """The state to store and the effects to send, in order."""

    state: ConversationState
    effects: list[Effect] = field(default_factory=list)
