"""The YAML configuration model: personas, routing rules, flows, channels, stage limits.

Pure pydantic models with no I/O; ``streams.settings.load_config`` reads the file and turns
validation errors into ``ConfigError`` messages naming the file, the field and what was expected.
Cross-field checks (a rule naming an unknown persona, an invalid regular expression, an unknown
custom rule) are done here so that every config error surfaces at start-up.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.models import Channel, MessageType

__all__ = [
    "ChannelConfig",
    "ConversationConfig",
    "DeliveryConfig",
    "EngineConfig",
    "FlowConfig",
    "KnowledgeBaseConfig",
    "LLMConfig",
    "ModelPrice",
    "PersonaConfig",
    "PreprocessConfig",
    "RouteAction",
    "RouteMatch",
    "RoutingConfig",
    "RoutingRule",
    "SwitchboardConfig",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(_Strict):
    """Limits applied by the ingest stage before routing.

    Every field a client sets is bounded, not only ``content``: what passes ingest is kept in
    the conversation's state (the waiting turns keep sender, subject and metadata; ids are
    remembered for dedup), so an unbounded field would let one message make a state too large
    to store. A message over any limit is dead-lettered (stage ``ingest.preprocess``).
    """

    max_content_chars: int = Field(4000, ge=1, description="Longer content is dead-lettered.")
    min_content_chars: int = Field(
        1, ge=0, description="Shorter (after trimming) is dead-lettered."
    )
    max_tenant_chars: int = Field(
        64,
        ge=1,
        description="Longer tenant names are dead-lettered. A tenant must also be non-empty "
        "and contain no '/' (it separates tenant and conversation id in the conversation "
        "key), no ':' (it separates tenant and message id in the dedup key) and no control "
        "character.",
    )
    max_message_id_chars: int = Field(
        256, ge=1, description="Longer message_id (or in_response_to) is dead-lettered."
    )
    max_conversation_id_chars: int = Field(
        256, ge=1, description="Longer conversation_id is dead-lettered."
    )
    max_sender_chars: int = Field(
        320,
        ge=1,
        description="Longer sender is dead-lettered. An e-mail address is at most 254 "
        "characters (RFC 5321 4.5.3.1.3: a path of at most 256 octets with its angle "
        "brackets; RFC 3696's 320 was corrected by its erratum 1690); 320 (64-octet local "
        "part, '@', 255-octet domain) also leaves room for other channels' sender ids.",
    )
    max_recipients: int = Field(
        100,
        ge=0,
        description="More recipients are dead-lettered (RFC 5321 4.5.3.1.8: an SMTP server "
        "must accept at least 100 per message).",
    )
    max_recipient_chars: int = Field(
        320, ge=1, description="A longer recipient is dead-lettered (see max_sender_chars)."
    )
    max_subject_chars: int = Field(
        998,
        ge=1,
        description="Longer subject is dead-lettered (998: the RFC 5322 2.1.1 line limit).",
    )
    max_metadata_bytes: int = Field(
        16384,
        ge=0,
        description="Metadata whose keys and values together are longer, in UTF-8 bytes, is "
        "dead-lettered.",
    )
    dedup_window_s: int = Field(
        3600, ge=0, description="A message id seen within this window is dropped (0 = off)."
    )
    blocked_terms: list[str] = Field(
        default_factory=list,
        description="Case-insensitive whole words that make the content filter reject a message.",
    )
    content_filters: list[str] = Field(
        default_factory=list,
        description="Names of content filter hooks registered with processors.preprocess.",
    )


class ConversationConfig(_Strict):
    """Conversation lifecycle settings."""

    max_history_turns: int = Field(20, ge=1, description="History kept per conversation.")
    inactivity_timeout_s: float = Field(
        1800.0, gt=0, description="A conversation idle this long is timed out."
    )
    llm_deadline_s: float = Field(
        60.0, gt=0, description="An LLM turn without a response after this is re-issued."
    )
    ended_retention_s: float = Field(
        86400.0,
        gt=0,
        description="An ended conversation (closed or timed out) is kept this long after it "
        "ended, then deleted from the table (a tombstone in the changelog). Until then its "
        "state recognises redelivered inputs by id and a new user turn continues it as its "
        "next session; after it the conversation id starts afresh. Keep it longer than any "
        "redelivery or replay of an input can be late.",
    )
    max_queued_turns: int = Field(
        64,
        ge=1,
        description="User turns that may wait behind the one in flight to the LLM; a turn "
        "beyond is dead-lettered (error_type QueueFull) instead of growing the state without "
        "bound.",
    )
    max_llm_attempts: int = Field(
        3,
        ge=1,
        description="LLM requests sent for one user turn (the first and its re-issues). When "
        "the last one's deadline passes without a response, the conversation stage answers "
        "the turn itself, as the LLM stage does when every engine failed (the persona's "
        "apology, or a handoff with llm.on_failure: handoff), so a turn whose responses never "
        "come (the LLM stage down, its responses lost) is still answered and the turns queued "
        "behind it go on. Must be above llm.answer_from_attempt, the attempt that answers "
        "whatever the engines do.",
    )


class KnowledgeBaseConfig(_Strict):
    """Question/answer pairs the local engine retrieves from.

    ``sources`` entries are paths to chatterbot-corpus style YAML files
    (``conversations: [[q, a, ...], ...]``) or ``chatterbot:<language>/<topic>`` for a file of
    the installed ``chatterbot-corpus`` package.
    """

    sources: list[str] = Field(min_length=1)
    min_score: float = Field(
        60.0, ge=0, le=100, description="rapidfuzz WRatio score (0-100) below which no answer."
    )


class EngineConfig(_Strict):
    """One LLM engine a persona may use, with its call policy and provider limits."""

    kind: Literal["local", "openai"] = "local"
    model: str = ""
    temperature: float | None = None
    max_tokens: int | None = Field(None, ge=1, description="Completion token cap.")
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint; None = OPENAI_BASE_URL or api.openai.com."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one HTTP call (s).")
    max_retries: int = Field(
        3, ge=0, description="Retries after the first attempt (429, 5xx, timeouts, bad bodies)."
    )
    backoff_initial_s: float = Field(0.5, gt=0, description="First backoff window (s).")
    backoff_max_s: float = Field(20.0, gt=0, description="Largest backoff window (s).")
    max_retry_after_s: float = Field(
        60.0,
        gt=0,
        description="Longest Retry-After honoured (s); a provider asking for longer fails this "
        "engine at once, so the next engine (or the apology) answers instead of a stalled stage.",
    )
    requests_per_minute: int | None = Field(None, ge=1, description="Provider request limit.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Provider token limit.")
    context_tokens: int = Field(
        8192, ge=256, description="Prompt token budget; older history is trimmed to fit."
    )
    latency_s: float = Field(
        0.0, ge=0, description="Local engine only: simulated latency per call (benchmarks)."
    )


class ModelPrice(_Strict):
    """Price of one model in USD per 1,000 tokens."""

    prompt_per_1k: float = Field(0.0, ge=0)
    completion_per_1k: float = Field(0.0, ge=0)


class LLMConfig(_Strict):
    """The LLM stage: concurrency, what happens when every engine fails, prices."""

    max_in_flight: int = Field(256, ge=1, description="LLM calls in flight per worker.")
    on_failure: Literal["apology", "handoff"] = Field(
        "apology",
        description="apology: the persona's apology_reply; handoff: escalate to the handoff topic.",
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Per model name; unknown models cost 0."
    )
    answer_from_attempt: int = Field(
        2,
        ge=0,
        description=(
            "Attempts of a turn before this one (LLMRequest.attempt, 0-based) stop at the "
            "turn's deadline and send nothing: the conversation stage re-issues the turn with "
            "a doubled deadline. From this attempt on the deadline is ignored, and the "
            "apology or handoff answers when every engine fails."
        ),
    )


class PersonaConfig(_Strict):
    """An AI agent persona: who answers and how (seed documents 000 and 004)."""

    name: str
    role: str = "assistant"
    traits: list[str] = Field(default_factory=list)
    tone: str = "friendly"
    language: str = "en"
    knowledge_base: str | None = Field(None, description="Name of a knowledge_bases entry.")
    fallback_reply: str = "Sorry, I don't know how to help with that yet."
    apology_reply: str = "Sorry, something went wrong on our side. Please try again shortly."
    business_rules: list[str] = Field(
        default_factory=list, description="Free-text domain rules added to the system prompt."
    )
    disclaimer: str | None = Field(None, description="Appended to every reply when set.")
    forbidden_topics: list[str] = Field(
        default_factory=list,
        description="Topics the persona must not discuss (prompt rule; a user turn naming one "
        "gets the fallback reply without an engine call).",
    )
    escalation_triggers: list[str] = Field(
        default_factory=list,
        description="Case-insensitive phrases that hand the conversation to a human.",
    )

    @model_validator(mode="after")
    def _models_name_own_engines(self) -> PersonaConfig:
        unknown = sorted(set(self.models) - set(self.engines))
        if unknown:
            raise ValueError(
                f"models names engine(s) {', '.join(map(repr, unknown))} that are not among "
                f"this persona's engines {self.engines}"
            )
        return self

    handoff_reply: str = "I'm passing you to a human colleague who will get back to you shortly."
    engines: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    model: str | None = Field(
        None,
        description="Overrides the model of every engine of this persona (a fallback engine of "
        "another provider rarely serves the same model: use models for those).",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Model per engine name for this persona; wins over model.",
    )
    temperature: float | None = Field(None, description="Overrides the engines' temperature.")
    max_tokens: int | None = Field(None, ge=1, description="Overrides the engines' max_tokens.")


class FlowConfig(_Strict):
    """A notification flow: deliver the message as-is on a channel."""

    channel: Channel | None = Field(
        None, description="Channel to deliver on; None = the message's own channel."
    )
    template: str = Field("{content}", description="str.format template over content/subject.")


class RouteMatch(_Strict):
    """Conditions of a rule; all given conditions must hold (AND)."""

    keywords: list[str] = Field(default_factory=list, description="Any word, case-insensitive.")
    regex: str | None = Field(None, description="Python regular expression searched in content.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Exact metadata values.")
    message_types: list[MessageType] = Field(default_factory=list)
    channels: list[Channel] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class RouteAction(_Strict):
    """What a matching rule decides: exactly one of persona, flow or drop."""

    persona: str | None = None
    flow: str | None = None
    drop: str | None = Field(
        None, description="Drop with this reason (dead-lettered, stage route)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RouteAction:
        given = [v for v in (self.persona, self.flow, self.drop) if v is not None]
        if len(given) != 1:
            raise ValueError("exactly one of persona, flow or drop must be set")
        return self


class RoutingRule(_Strict):
    """One routing rule. Higher ``priority`` is tried first; ties keep file order."""

    name: str
    priority: int = 0
    match: RouteMatch | None = None
    custom: str | None = Field(
        None, description="Name of a custom rule registered with processors.router.register_rule."
    )
    action: RouteAction | None = Field(
        None, description="Required unless a custom rule decides the action itself."
    )
    override_continuity: bool = Field(
        False,
        description="When true, the decision replaces the persona of an ongoing conversation.",
    )

    @model_validator(mode="after")
    def _has_condition(self) -> RoutingRule:
        if self.match is None and self.custom is None:
            raise ValueError(f"rule {self.name!r} needs 'match' or 'custom'")
        if self.custom is None and self.action is None:
            raise ValueError(f"rule {self.name!r} needs an 'action'")
        return self


class RoutingConfig(_Strict):
    """Ordered rules and defaults for the router."""

    default_persona: str
    continuity: bool = Field(True, description="Stay with the conversation's persona.")
    notification_flow: str | None = Field(
        "notify", description="Flow for non-chat message types when no rule matches."
    )
    rules: list[RoutingRule] = Field(default_factory=list)


class ChannelConfig(_Strict):
    """Which connector delivers a channel, and its options."""

    connector: str = Field(description="Connector name, e.g. outbox or smtp.")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class DeliveryConfig(_Strict):
    """Retry policy of the delivery stage."""

    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)


class SwitchboardConfig(_Strict):
    """The whole YAML configuration file (``SWITCHBOARD_CONFIG``)."""

    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    conversation: ConversationConfig = Field(default_factory=ConversationConfig)
    knowledge_bases: dict[str, KnowledgeBaseConfig] = Field(default_factory=dict)
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"local": EngineConfig(kind="local")}
    )
    personas: dict[str, PersonaConfig] = Field(min_length=1)
    flows: dict[str, FlowConfig] = Field(default_factory=lambda: {"notify": FlowConfig()})
    routing: RoutingConfig
    channels: dict[Channel, ChannelConfig] = Field(
        default_factory=lambda: {Channel.CHAT: ChannelConfig(connector="outbox")}
    )
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)

    def persona(self, name: str) -> PersonaConfig:
        """The persona ``name``, or ``routing.default_persona`` when the config no longer has
        it (a record written under an older config)."""
        found = self.personas.get(name)
        return found if found is not None else self.personas[self.routing.default_persona]

    @model_validator(mode="after")
    def _references_resolve(self) -> SwitchboardConfig:
        personas, flows = set(self.personas), set(self.flows)
        if self.conversation.max_llm_attempts <= self.llm.answer_from_attempt:
            raise ValueError(
                f"conversation.max_llm_attempts ({self.conversation.max_llm_attempts}) must be "
                f"above llm.answer_from_attempt ({self.llm.answer_from_attempt}): the attempt "
                "that answers whatever the engines do would never be sent"
            )
        if self.routing.default_persona not in personas:
            raise ValueError(
                f"routing.default_persona {self.routing.default_persona!r} is not a persona "
                f"(known: {sorted(personas)})"
            )
        if (
            self.routing.notification_flow is not None
            and self.routing.notification_flow not in flows
        ):
            raise ValueError(
                f"routing.notification_flow {self.routing.notification_flow!r} is not a flow "
                f"(known: {sorted(flows)})"
            )
        for rule in self.routing.rules:
            action = rule.action
            if action is not None and action.persona is not None and action.persona not in personas:
                raise ValueError(
                    f"routing rule {rule.name!r}: unknown persona {action.persona!r} "
                    f"(known: {sorted(personas)})"
                )
            if action is not None and action.flow is not None and action.flow not in flows:
                raise ValueError(
                    f"routing rule {rule.name!r}: unknown flow {action.flow!r} "
                    f"(known: {sorted(flows)})"
                )
        for pname, persona in self.personas.items():
            if (
                persona.knowledge_base is not None
                and persona.knowledge_base not in self.knowledge_bases
            ):
                raise ValueError(
                    f"persona {pname!r}: unknown knowledge_base {persona.knowledge_base!r} "
                    f"(known: {sorted(self.knowledge_bases)})"
                )
            for engine in persona.engines:
                if engine not in self.engines:
                    raise ValueError(
                        f"persona {pname!r}: unknown engine {engine!r} "
                        f"(known: {sorted(self.engines)})"
                    )
        return self
