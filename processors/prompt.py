"""Prompt building: a persona's system prompt and the chat messages of one LLM turn."""

from __future__ import annotations

from collections.abc import Sequence

from processors.business_rules import business_rule_lines
from processors.config import PersonaConfig
from schemas.models import ChatMessage, Role

__all__ = ["build_messages", "build_system_prompt"]


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces and strip."""
    return " ".join(text.split())


def _with_article(noun: str) -> str:
    """Prefix ``noun`` with "a" or "an" by its first letter (a vowel-letter heuristic)."""
    article = "an" if noun[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return f"{article} {noun}"


def build_system_prompt(persona: PersonaConfig) -> str:
    """Return the system prompt of a persona (seed 004: personality, tone, business rules).

    One statement per line; the traits line and the rules block are left out when empty, and
    every field is collapsed to one line so that config text cannot break the layout::

        You are Alex, a Support specialist.
        Personality: patient, precise.
        Tone: friendly.
        Answer in language: en.
        Rules:
        - Never promise refunds.
        - Do not discuss: crypto.
        - If the user mentions "complaint", say you will hand over to a human.
        - End every reply with: This is not financial advice.

    The rules block is :func:`processors.business_rules.business_rule_lines`: the free-text
    business rules, then the forbidden topics, escalation triggers and disclaimer.

    Args:
        persona: The persona's config.

    Returns:
        The prompt text, without a trailing newline.
    """
    role = _one_line(persona.role).rstrip(".") or "assistant"
    lines = [f"You are {_one_line(persona.name)}, {_with_article(role)}."]
    traits = [_one_line(t) for t in persona.traits if t.strip()]
    if traits:
        lines.append(f"Personality: {', '.join(traits)}.")
    lines.append(f"Tone: {_one_line(persona.tone)}.")
    lines.append(f"Answer in language: {_one_line(persona.language)}.")
    rules = business_rule_lines(persona)
    if rules:
        lines.append("Rules:")
        lines.extend(f"- {rule}" for rule in rules)
    return "\n".join(lines)


_SYSTEM_PROMPTS: dict[int, tuple[PersonaConfig, str]] = {}


def _system_prompt(persona: PersonaConfig) -> str:
    """``build_system_prompt``, remembered per persona object (configs are not changed after
    loading; the object is kept with its prompt so that its id is never reused meanwhile)."""
    found = _SYSTEM_PROMPTS.get(id(persona))
    if found is not None and found[0] is persona:
        return found[1]
    prompt = build_system_prompt(persona)
    if len(_SYSTEM_PROMPTS) >= 1024:
        _SYSTEM_PROMPTS.clear()
    _SYSTEM_PROMPTS[id(persona)] = (persona, prompt)
    return prompt


def build_messages(
    persona: PersonaConfig,
    history: Sequence[ChatMessage],
    user_content: str,
    max_turns: int,
) -> list[ChatMessage]:
    """Return the messages of one LLM call, oldest first.

    The persona's system prompt, then the last ``max_turns`` messages of ``history`` (each
    user or assistant message counts as one), then ``user_content`` as the user turn.

    Args:
        persona: The persona answering.
        history: Earlier messages of the conversation, oldest first, without the current turn.
        user_content: The content of the turn to answer.
        max_turns: How many history messages to keep (0 keeps none).

    Returns:
        ``[system, *history[-max_turns:], user]``: ``max_turns + 2`` messages at most.

    Raises:
        ValueError: ``max_turns`` is negative.
    """
    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    kept = list(history[max(0, len(history) - max_turns) :])
    return [
        ChatMessage(role=Role.SYSTEM, content=_system_prompt(persona)),
        *kept,
        ChatMessage(role=Role.USER, content=user_content),
    ]
