"""The router: choose a persona, a notification flow or a drop for each inbound message."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from processors.config import RouteAction, RouteMatch, RoutingRule, SwitchboardConfig
from schemas.models import Channel, InboundMessage, MessageType

__all__ = [
    "CustomRule",
    "RouteDecision",
    "Router",
    "register_rule",
    "registered_rules",
]

CustomRule = Callable[[InboundMessage], RouteAction | None]
"""A custom rule: returns the action to take, or None when the rule does not apply."""

_RULES: dict[str, CustomRule] = {}


def register_rule(name: str) -> Callable[[CustomRule], CustomRule]:
    """Register a custom routing rule under ``name`` (decorator).

    A config rule refers to it with ``custom: <name>``; the rule matches when its ``match``
    conditions hold and the function returns an action, which replaces the rule's ``action``.

    Raises:
        ValueError: ``name`` is already registered to another function.
    """

    def decorator(func: CustomRule) -> CustomRule:
        existing = _RULES.get(name)
        if existing is not None and existing is not func:
            raise ValueError(f"custom rule {name!r} is already registered to {existing!r}")
        _RULES[name] = func
        return func

    return decorator


def registered_rules() -> list[str]:
    """Return the names of the registered custom rules, sorted."""
    return sorted(_RULES)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a message goes.

    Attributes:
        kind: ``"persona"`` (a conversation turn), ``"flow"`` (a notification) or ``"drop"``.
        target: The persona or flow name; for ``"drop"`` the reason.
        rule: The deciding rule's name, or ``"routing_slip"``, ``"default"``,
            ``"notification_default"``.
        override_continuity: True when the decision replaces the persona of an ongoing
            conversation instead of yielding to it.
    """

    kind: Literal["persona", "flow", "drop"]
    target: str
    rule: str
    override_continuity: bool = False


def _word_pattern(words: list[str]) -> re.Pattern[str] | None:
    """Compile words into one case-insensitive regex matching any of them as a whole word."""
    alternatives = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not alternatives:
        return None
    body = "|".join(re.escape(w) for w in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A routing rule with its conditions prepared once, at start-up."""

    rule: RoutingRule
    keywords: re.Pattern[str] | None
    regex: re.Pattern[str] | None
    metadata: tuple[tuple[str, str], ...]
    message_types: frozenset[MessageType]
    channels: frozenset[Channel]
    tenants: frozenset[str]
    custom: CustomRule | None

    @classmethod
    def compile(cls, rule: RoutingRule) -> _CompiledRule:
        match = rule.match or RouteMatch.model_validate({})
        custom = None
        if rule.custom is not None:
            custom = _RULES.get(rule.custom)
            if custom is None:
                raise ValueError(
                    f"routing rule {rule.name!r}: custom rule {rule.custom!r} is not registered "
                    f"(registered: {registered_rules()})"
                )
        return cls(
            rule=rule,
            keywords=_word_pattern(match.keywords),
            regex=re.compile(match.regex) if match.regex is not None else None,
            metadata=tuple(match.metadata.items()),
            message_types=frozenset(match.message_types),
            channels=frozenset(match.channels),
            tenants=frozenset(match.tenants),
            custom=custom,
        )

    def conditions_hold(self, msg: InboundMessage) -> bool:
        """Return True when every given ``match`` condition holds (cheapest checks first)."""
        return (
            (not self.message_types or msg.message_type in self.message_types)
            and (not self.channels or msg.channel in self.channels)
            and (not self.tenants or msg.tenant in self.tenants)
            and all(msg.metadata.get(k) == v for k, v in self.metadata)
            and (self.keywords is None or self.keywords.search(msg.content) is not None)
            and (self.regex is None or self.regex.search(msg.content) is not None)
        )


class Router:
    """Routes inbound messages by the ``routing`` section of the config.

    Rules are compiled once here (regular expressions, keyword patterns, custom-rule lookup)
    and ordered by ``priority`` descending; rules of equal priority keep their file order.
    """

    def __init__(self, config: SwitchboardConfig) -> None:
        """Compile the rules of ``config``.

        Raises:
            ValueError: a rule's ``custom`` names no registered custom rule; the message names
                the rule, the custom name and the registered names.
        """
        self._routing = config.routing
        self._personas = frozenset(config.personas)
        self._flows = frozenset(config.flows)
        ordered = sorted(config.routing.rules, key=lambda r: -r.priority)
        self._rules = tuple(_CompiledRule.compile(rule) for rule in ordered)

    @property
    def rule_names(self) -> list[str]:
        """The rule names in the order they are tried."""
        return [compiled.rule.name for compiled in self._rules]

    def route(self, msg: InboundMessage) -> RouteDecision:
        """Decide where ``msg`` goes.

        Order: (1) the first ``routing_slip`` entry naming a known persona (checked first) or
        flow, with ``override_continuity=True`` since the producer addressed it explicitly;
        (2) the first rule whose conditions hold and, if it has a custom rule, whose custom
        function returns an action (which replaces ``rule.action``); (3) defaults: chat
        messages go to ``routing.default_persona`` (rule ``"default"``), other message types to
        ``routing.notification_flow`` (rule ``"notification_default"``), or to the default
        persona when that is None.

        A custom function returning an unknown persona or flow yields a ``"drop"`` decision
        whose reason says so, so that the message is dead-lettered rather than lost.
        """
        for entry in msg.routing_slip:
            if entry in self._personas:
                return RouteDecision("persona", entry, "routing_slip", True)
            if entry in self._flows:
                return RouteDecision("flow", entry, "routing_slip", True)
        for compiled in self._rules:
            if not compiled.conditions_hold(msg):
                continue
            action = compiled.rule.action
            if compiled.custom is not None:
                action = compiled.custom(msg)
                if action is None:
                    continue
            assert action is not None  # RoutingRule guarantees an action when custom is None
            return self._decide(action, compiled.rule)
        routing = self._routing
        if msg.message_type is not MessageType.CHAT and routing.notification_flow is not None:
            return RouteDecision("flow", routing.notification_flow, "notification_default")
        return RouteDecision("persona", routing.default_persona, "default")

    def _decide(self, action: RouteAction, rule: RoutingRule) -> RouteDecision:
        override = rule.override_continuity
        if action.persona is not None:
            if action.persona not in self._personas:
                reason = f"rule {rule.name!r} chose unknown persona {action.persona!r}"
                return RouteDecision("drop", reason, rule.name, override)
            return RouteDecision("persona", action.persona, rule.name, override)
        if action.flow is not None:
            if action.flow not in self._flows:
                reason = f"rule {rule.name!r} chose unknown flow {action.flow!r}"
                return RouteDecision("drop", reason, rule.name, override)
            return RouteDecision("flow", action.flow, rule.name, override)
        assert action.drop is not None  # RouteAction guarantees exactly one target
        return RouteDecision("drop", action.drop, rule.name, override)
