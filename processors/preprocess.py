"""Ingest pre-processing: check tenant, field limits and expiry, normalise content, run filters."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from processors.config import PreprocessConfig
from schemas.models import InboundMessage

__all__ = [
    "BLOCKED_TERMS_FILTER",
    "STAGE",
    "Accepted",
    "ContentFilter",
    "Rejected",
    "check_content_filters",
    "content_filter",
    "conversation_id_for",
    "conversation_key",
    "dedup_key",
    "find_blocked_term",
    "normalize_text",
    "preprocess",
    "register_content_filter",
    "registered_content_filters",
    "tenant_problem",
]

STAGE = "ingest.preprocess"
BLOCKED_TERMS_FILTER = "blocked_terms"

ContentFilter = Callable[[InboundMessage], str | None]
"""A content filter hook: returns a rejection reason, or None to let the message pass."""

_CONTENT_FILTERS: dict[str, ContentFilter] = {}

# Every Unicode "Cc" character (C0 0x00-0x1F, DEL 0x7F, C1 0x80-0x9F) except \t and \n.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEWLINE = re.compile(r"\r\n?")
_BLANKS = re.compile(r"[ \t]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message that passed pre-processing; ``message.content`` is normalised."""

    message: InboundMessage
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message to dead-letter: ``stage``, a precise ``reason`` and a short ``error_type``."""

    stage: str
    reason: str
    error_type: str


def normalize_text(text: str) -> str:
    """Return ``text`` in the canonical (possibly empty) form the rest of the pipeline sees.

    Steps, in order: ``\\r\\n`` and ``\\r`` become ``\\n``; control characters (Unicode
    category Cc: C0, DEL, C1) other than ``\\n`` and ``\\t`` are removed; Unicode NFC
    (``unicodedata.normalize``, after the removal so that a removed character cannot leave an
    uncomposed pair behind); runs of spaces and tabs become one space; trailing whitespace of
    every line is stripped; three or more newlines become two; the whole is stripped.
    Idempotent: ``normalize_text(normalize_text(s)) == normalize_text(s)``.
    """
    text = _NEWLINE.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _BLANKS.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def conversation_id_for(msg: InboundMessage) -> str:
    """Return the conversation a message belongs to.

    ``msg.conversation_id`` when it is set and non-empty; otherwise the stable key
    ``f"{tenant}:{channel}:{sender}"`` (channel as its Avro symbol, e.g. ``acme:sms:+4412``),
    so that every message from one sender on one channel of one tenant joins one conversation.
    """
    if msg.conversation_id:
        return msg.conversation_id
    return f"{msg.tenant}:{msg.channel.value}:{msg.sender}"


def conversation_key(tenant: str, conversation_id: str) -> str:
    """The Kafka record key and table key of a conversation: ``<tenant>/<conversation_id>``.

    Conversation ids come from clients, so two tenants may use the same one; scoping the key
    by tenant keeps their state, history and persona apart. Records of one conversation on
    every conversation-keyed topic carry this key, which keeps those topics co-partitioned.
    """
    return f"{tenant}/{conversation_id}"


def dedup_key(msg: InboundMessage) -> str:
    """Return the Redis idempotency key of a message: ``f"dedup:{tenant}:{message_id}"``."""
    return f"dedup:{msg.tenant}:{msg.message_id}"


def register_content_filter(name: str) -> Callable[[ContentFilter], ContentFilter]:
    """Register a content filter hook under ``name`` (decorator).

    Enable it by listing ``name`` in ``preprocess.content_filters`` of the YAML config. The hook
    receives the message with normalised content and returns a rejection reason or None.

    Raises:
        ValueError: ``name`` is the built-in ``"blocked_terms"`` or is already registered to
            another function.
    """

    def decorator(func: ContentFilter) -> ContentFilter:
        if name == BLOCKED_TERMS_FILTER:
            raise ValueError(f"content filter name {name!r} is reserved for the built-in filter")
        existing = _CONTENT_FILTERS.get(name)
        if existing is not None and existing is not func:
            raise ValueError(f"content filter {name!r} is already registered to {existing!r}")
        _CONTENT_FILTERS[name] = func
        return func

    return decorator


def registered_content_filters() -> list[str]:
    """Return the names of the registered content filter hooks, sorted."""
    return sorted(_CONTENT_FILTERS)


def content_filter(name: str) -> ContentFilter:
    """Return the content filter hook registered under ``name``.

    Raises:
        KeyError: no hook has that name; the message lists the registered names.
    """
    try:
        return _CONTENT_FILTERS[name]
    except KeyError:
        raise KeyError(
            f"unknown content filter {name!r} (registered: {registered_content_filters()})"
        ) from None


def check_content_filters(cfg: PreprocessConfig) -> None:
    """Check at start-up that every name in ``cfg.content_filters`` is registered.

    Raises:
        KeyError: the first unknown name, with the registered names listed.
    """
    for name in cfg.content_filters:
        content_filter(name)


@lru_cache(maxsize=32)
def _blocked_terms_pattern(terms: tuple[str, ...]) -> re.Pattern[str] | None:
    """Compile the terms into one case-insensitive whole-word regex; group ``tN`` is term N."""
    alternatives = [
        f"(?P<t{i}>{re.escape(normalize_text(term))})"
        for i, term in enumerate(terms)
        if term.strip()
    ]
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def find_blocked_term(content: str, terms: Iterable[str]) -> str | None:
    """Return the configured term found in ``content`` as a whole word, or None.

    Matching is case-insensitive; a "whole word" is not preceded or followed by a word
    character (``\\w``), so terms may contain spaces or punctuation (``"free money"``).
    Compiled patterns are cached per tuple of terms.
    """
    terms = tuple(terms)
    pattern = _blocked_terms_pattern(terms)
    if pattern is None:
        return None
    match = pattern.search(content)
    if match is None or match.lastgroup is None:
        return None
    return terms[int(match.lastgroup[1:])]


def _expiry(msg: InboundMessage, now: datetime) -> Rejected | None:
    if msg.ttl_ms is None:
        return None
    start = msg.scheduled_for or msg.created_at
    deadline = start + timedelta(milliseconds=msg.ttl_ms)
    if now < deadline:
        return None
    elapsed = f"ttl_ms={msg.ttl_ms} elapsed at {deadline.isoformat()} (now {now.isoformat()})"
    return Rejected(STAGE, f"message expired: {elapsed}", "MessageExpired")


def _limits(content: str, cfg: PreprocessConfig) -> Rejected | None:
    size = len(content)
    if size > cfg.max_content_chars:
        reason = (
            f"content is {size} characters, limit is {cfg.max_content_chars} "
            "(preprocess.max_content_chars)"
        )
        return Rejected(STAGE, reason, "ContentTooLong")
    if size == 0 and cfg.min_content_chars > 0:
        return Rejected(STAGE, "content is empty after normalisation", "EmptyContent")
    if size < cfg.min_content_chars:
        reason = (
            f"content is {size} characters, minimum is {cfg.min_content_chars} "
            "(preprocess.min_content_chars)"
        )
        return Rejected(STAGE, reason, "ContentTooShort")
    return None


_TENANT_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN_CHARS = 64
"""Characters of a rejected field value quoted in a reason (the rest is elided)."""


def _shown(value: str) -> str:
    """``repr(value)`` of at most the first ``_SHOWN_CHARS`` characters (``...`` after it)."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}..."


def tenant_problem(tenant: str, max_chars: int) -> str | None:
    """Why ``tenant`` may not be used, or None when it may.

    The tenant is part of the keys that keep tenants apart: ``conversation_key`` joins it to
    the conversation id with ``/`` and ``dedup_key`` to the message id with ``:``; a tenant
    containing either could share a conversation (state, history sent to the LLM) or a
    message id with another tenant. So it must be non-empty, at most ``max_chars``
    characters, and without ``/``, ``:`` or control characters. The conversation stage checks
    records written straight to its topics with the same rule.
    """
    if not tenant:
        rule = "is empty"
    elif len(tenant) > max_chars:
        rule = f"is {len(tenant)} characters, limit is {max_chars} (preprocess.max_tenant_chars)"
    elif "/" in tenant:
        rule = "contains '/', which separates tenant and conversation id in conversation keys"
    elif ":" in tenant:
        rule = "contains ':', which separates tenant and message id in dedup keys"
    elif _TENANT_CONTROL.search(tenant):
        rule = "contains a control character"
    else:
        return None
    return f"tenant {_shown(tenant)} {rule}"


def _tenant(tenant: str, cfg: PreprocessConfig) -> Rejected | None:
    problem = tenant_problem(tenant, cfg.max_tenant_chars)
    return None if problem is None else Rejected(STAGE, problem, "InvalidTenant")


def _too_long(field: str, size: int, limit: int, setting: str, error_type: str) -> Rejected:
    reason = f"{field} is {size} characters, limit is {limit} (preprocess.{setting})"
    return Rejected(STAGE, reason, error_type)


def _fields(msg: InboundMessage, cfg: PreprocessConfig) -> Rejected | None:
    """Size limits of every client-set field other than ``content`` (checked in this order).

    Plain comparisons first: this runs for every message, and a rejection is rare.
    """
    if not msg.message_id or msg.message_id.isspace():
        reason = (
            f"message_id {msg.message_id!r} is blank: it is the message's idempotency key, so "
            "every blank id would count as the same message and all but the first be dropped"
        )
        return Rejected(STAGE, reason, "MissingMessageId")
    ids, conversations = cfg.max_message_id_chars, cfg.max_conversation_id_chars
    limited = (
        ("message_id", msg.message_id, ids, "max_message_id_chars", "MessageIdTooLong"),
        ("in_response_to", msg.in_response_to, ids, "max_message_id_chars", "MessageIdTooLong"),
        (
            "conversation_id",
            msg.conversation_id,
            conversations,
            "max_conversation_id_chars",
            "ConversationIdTooLong",
        ),
        ("sender", msg.sender, cfg.max_sender_chars, "max_sender_chars", "SenderTooLong"),
        ("subject", msg.subject, cfg.max_subject_chars, "max_subject_chars", "SubjectTooLong"),
    )
    for field, value, limit, setting, error_type in limited:
        if value is not None and len(value) > limit:
            return _too_long(field, len(value), limit, setting, error_type)
    recipients = msg.recipients
    if recipients:
        if len(recipients) > cfg.max_recipients:
            reason = (
                f"{len(recipients)} recipients, limit is {cfg.max_recipients} "
                "(preprocess.max_recipients)"
            )
            return Rejected(STAGE, reason, "TooManyRecipients")
        limit = cfg.max_recipient_chars
        for index, recipient in enumerate(recipients):
            if len(recipient) > limit:
                field, size = f"recipients[{index}]", len(recipient)
                return _too_long(field, size, limit, "max_recipient_chars", "RecipientTooLong")
    metadata = msg.metadata
    if metadata:
        limit = cfg.max_metadata_bytes
        chars = sum(map(len, metadata)) + sum(map(len, metadata.values()))
        if 4 * chars > limit:  # else within the limit: UTF-8 takes at most 4 bytes a character
            size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
            if size > limit:
                reason = (
                    f"metadata is {size} bytes (UTF-8 keys and values of {len(metadata)} "
                    f"entries), limit is {limit} (preprocess.max_metadata_bytes)"
                )
                return Rejected(STAGE, reason, "MetadataTooLarge")
    return None


def preprocess(msg: InboundMessage, cfg: PreprocessConfig, now: datetime) -> Accepted | Rejected:
    """Normalise one decoded inbound message and decide whether it goes on to routing.

    Checks, in order; the first that fails rejects the message:

    1. The tenant (``InvalidTenant``): not empty, at most ``max_tenant_chars``, and without
       ``/``, ``:`` or control characters, which would let two tenants share a conversation
       key (:func:`conversation_key`) or a dedup key (:func:`dedup_key`).
    2. A blank ``message_id`` (``MissingMessageId``: it is the idempotency key), then field
       sizes, in characters: ``message_id`` and ``in_response_to``
       (``max_message_id_chars``, ``MessageIdTooLong``), ``conversation_id``
       (``max_conversation_id_chars``, ``ConversationIdTooLong``), ``sender``
       (``max_sender_chars``, ``SenderTooLong``), ``subject`` (``max_subject_chars``,
       ``SubjectTooLong``); the number of ``recipients`` (``max_recipients``,
       ``TooManyRecipients``) and each one's length (``max_recipient_chars``,
       ``RecipientTooLong``); then the UTF-8 bytes of all metadata keys and values together
       (``max_metadata_bytes``, ``MetadataTooLarge``).
    3. Expiry (``ttl_ms`` counted from ``scheduled_for`` when set, else from ``created_at``;
       expired when ``now >= start + ttl``; ``MessageExpired``).
    4. Content length after :func:`normalize_text` (``max_content_chars``, then empty, then
       ``min_content_chars``).
    5. The built-in blocked-terms filter, then each hook of ``cfg.content_filters`` in order.

    De-duplication is not done here: it needs Redis; the stage uses :func:`dedup_key`.

    Args:
        msg: The decoded message.
        cfg: The ``preprocess`` section of the config.
        now: Current time, timezone-aware UTC.

    Returns:
        ``Accepted`` with the normalised copy of the message and its conversation id, or
        ``Rejected`` (stage ``"ingest.preprocess"``) saying why, to be dead-lettered.

    Raises:
        KeyError: a name in ``cfg.content_filters`` is not registered (call
            :func:`check_content_filters` at start-up to fail early instead).
        Exception: whatever a registered hook raises is propagated unchanged.
    """
    invalid = _tenant(msg.tenant, cfg)
    if invalid is None:
        invalid = _fields(msg, cfg)
    if invalid is not None:
        return invalid
    expired = _expiry(msg, now)
    if expired is not None:
        return expired
    content = normalize_text(msg.content)
    too_long_or_short = _limits(content, cfg)
    if too_long_or_short is not None:
        return too_long_or_short
    term = find_blocked_term(content, cfg.blocked_terms)
    if term is not None:
        reason = f"blocked by content filter {BLOCKED_TERMS_FILTER!r}: term {term!r}"
        return Rejected(STAGE, reason, "ContentBlocked")
    normalised = msg.model_copy(update={"content": content})
    for name in cfg.content_filters:
        hook_reason = content_filter(name)(normalised)
        if hook_reason is not None:
            reason = f"blocked by content filter {name!r}: {hook_reason}"
            return Rejected(STAGE, reason, "ContentBlocked")
    return Accepted(normalised, conversation_id_for(normalised))
