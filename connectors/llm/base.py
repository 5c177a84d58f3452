"""The LLM engine interface: one async ``complete`` plus ``aclose``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from processors.config import PersonaConfig
from schemas.models import ChatMessage

__all__ = ["Completion", "CompletionRequest", "LLMEngine"]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """What an engine is asked.

    Attributes:
        persona_id: Key of the persona in the config.
        persona: The persona answering.
        messages: The prompt, oldest first; a system message first when the engine wants one.
        model: Model name ('' = the engine's default).
        temperature: Sampling temperature, or None for the engine default.
        max_tokens: Completion token cap, or None.
    """

    persona_id: str
    persona: PersonaConfig
    messages: list[ChatMessage]
    model: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Completion:
    """An engine's answer.

    Attributes:
        content: The reply text.
        model: The model that answered.
        finish_reason: e.g. 'stop', 'length', 'fallback' (no knowledge-base match).
        prompt_tokens: Tokens in the prompt (as reported, or estimated).
        completion_tokens: Tokens in the reply.
    """

    content: str
    model: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMEngine(ABC):
    """Produces one completion per call. Raise ``connectors.errors.EngineError`` on failure."""

    name: str = "engine"

    @abstractmethod
    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook with a default
        """Release clients. The default does nothing."""
