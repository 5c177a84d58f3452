"""A persona's business rules: the pre-call turn check, the post-call reply fix-up, prompt lines."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

from processors.config import PersonaConfig
from schemas.models import LLMStatus

__all__ = [
    "Answer",
    "Decline",
    "Escalate",
    "TurnVerdict",
    "business_rule_lines",
    "check_turn",
    "failure_reply",
    "finalize_reply",
    "find_phrase",
]

_DEFAULT_FALLBACK: str = str(PersonaConfig.model_fields["fallback_reply"].default)


@dataclass(frozen=True, slots=True)
class Answer:
    """The turn may go to the persona's engines."""


@dataclass(frozen=True, slots=True)
class Escalate:
    """The turn names an escalation trigger: hand the conversation to a human.

    Attributes:
        trigger: The configured trigger phrase that occurs, as written in the config.
    """

    trigger: str


@dataclass(frozen=True, slots=True)
class Decline:
    """The turn names a forbidden topic: reply with the persona's fallback, no engine call.

    Attributes:
        topic: The configured forbidden topic that occurs, as written in the config.
    """

    topic: str


TurnVerdict: TypeAlias = Answer | Escalate | Decline
"""What the LLM stage does with one user turn."""


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces and strip."""
    return " ".join(text.split())


@lru_cache(maxsize=256)
def _phrase_patterns(phrases: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Compile each non-blank phrase to a case-insensitive whole-phrase pattern, in order.

    A phrase's words are escaped and joined by ``\\s+``, so a line break or a double space
    between the words of the user's text still matches; the phrase must not be preceded or
    followed by a word character (``\\w``, Unicode-aware), so ``"loan"`` does not match
    ``"loans"`` and phrases may begin or end with punctuation (``"C++"``).
    """
    compiled: list[tuple[str, re.Pattern[str]]] = []
    for phrase in phrases:
        words = phrase.split()
        if not words:
            continue
        body = r"\s+".join(re.escape(word) for word in words)
        compiled.append((phrase, re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)))
    return tuple(compiled)


def find_phrase(text: str, phrases: Iterable[str]) -> str | None:
    """Return the first configured phrase that occurs in ``text``, or None.

    Matching is case-insensitive on whole words/phrases (see the module's ``_phrase_patterns``);
    blank phrases are ignored. When several phrases occur, the one listed first in ``phrases``
    wins (config order is priority order), not the one that occurs first in ``text``.

    Args:
        text: The text to search, e.g. a user turn.
        phrases: Phrases in priority order.

    Returns:
        The phrase exactly as given in ``phrases``, or None when none occurs.
    """
    for phrase, pattern in _phrase_patterns(tuple(phrases)):
        if pattern.search(text) is not None:
            return phrase
    return None


def check_turn(persona: PersonaConfig, user_content: str) -> TurnVerdict:
    """Decide before any engine call what to do with one user turn (seed 004 business rules).

    Escalation wins over decline: a turn naming both an escalation trigger and a forbidden
    topic is escalated, because a human can handle the topic a persona may not.

    Args:
        persona: The persona the turn is routed to.
        user_content: The content of the user turn.

    Returns:
        ``Escalate(trigger)`` when one of ``persona.escalation_triggers`` occurs,
        else ``Decline(topic)`` when one of ``persona.forbidden_topics`` occurs, else
        ``Answer()``. Matching is that of :func:`find_phrase`.
    """
    trigger = find_phrase(user_content, persona.escalation_triggers)
    if trigger is not None:
        return Escalate(trigger)
    topic = find_phrase(user_content, persona.forbidden_topics)
    if topic is not None:
        return Decline(topic)
    return Answer()


def _fold(text: str) -> str:
    return _one_line(text).casefold()


def finalize_reply(persona: PersonaConfig, content: str) -> str:
    """Return the reply to deliver: stripped, never empty, with the persona's disclaimer.

    Blank ``content`` is replaced by ``persona.fallback_reply`` (or, when that is blank too,
    by the config's default fallback). A set, non-blank disclaimer is appended as its own
    paragraph (``"\\n\\n"``) unless the reply already contains it anywhere; that check ignores
    case and whitespace differences, since the system prompt asks the model to write it itself.

    Args:
        persona: The persona that answered.
        content: The engine's reply, or any reply text the stage is about to send.

    Returns:
        The non-empty reply text.
    """
    reply = content.strip() or persona.fallback_reply.strip() or _DEFAULT_FALLBACK
    disclaimer = (persona.disclaimer or "").strip()
    if disclaimer and _fold(disclaimer) not in _fold(reply):
        reply = f"{reply}\n\n{disclaimer}"
    return reply


def failure_reply(
    persona: PersonaConfig, on_failure: str, status: LLMStatus = LLMStatus.FALLBACK
) -> tuple[LLMStatus, str]:
    """Return the status and reply of a turn no engine answered.

    Args:
        persona: The turn's persona.
        on_failure: ``llm.on_failure``: ``"handoff"`` escalates the turn with the persona's
            ``handoff_reply``; anything else (``"apology"``) answers with its
            ``apology_reply``.
        status: The status of the apology: ``fallback`` when the engines failed, ``failed``
            when something else did (an unexpected error, a reply that cannot be kept).

    Returns:
        ``(LLMStatus.ESCALATED, handoff reply)`` or ``(status, apology)``, each passed
        through :func:`finalize_reply`.
    """
    if on_failure == "handoff":
        return LLMStatus.ESCALATED, finalize_reply(persona, persona.handoff_reply)
    return status, finalize_reply(persona, persona.apology_reply)


def business_rule_lines(persona: PersonaConfig) -> list[str]:
    """Return the rule lines the system prompt lists for a persona, each on one line.

    In order: every non-blank free-text ``business_rules`` entry; ``"Do not discuss: <topics>."``
    when there are forbidden topics; ``'If the user mentions "<t1>", "<t2>", say you will hand
    over to a human.'`` when there are escalation triggers; ``"End every reply with:
    <disclaimer>"`` when a disclaimer is set. Whitespace (newlines included) inside each value
    is collapsed, so config text cannot add lines of its own.

    Args:
        persona: The persona's config.

    Returns:
        The lines, without bullets; empty when the persona has no rules.
    """
    lines = [_one_line(rule) for rule in persona.business_rules if rule.strip()]
    topics = [_one_line(t) for t in persona.forbidden_topics if t.strip()]
    if topics:
        lines.append(f"Do not discuss: {', '.join(topics)}.")
    triggers = [_one_line(t) for t in persona.escalation_triggers if t.strip()]
    if triggers:
        quoted = ", ".join(f'"{t}"' for t in triggers)
        lines.append(f"If the user mentions {quoted}, say you will hand over to a human.")
    disclaimer = _one_line(persona.disclaimer or "")
    if disclaimer:
        lines.append(f"End every reply with: {disclaimer}")
    return lines
