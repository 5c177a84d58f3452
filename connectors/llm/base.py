"""The LLM engine interface: one async ``complete`` plus ``aclose``, and what a call reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from connectors.errors import EngineError
from processors.config import PersonaConfig
from schemas.models import ChatMessage

__all__ = [
    "CallRecord",
    "Completion",
    "CompletionRequest",
    "ContextLengthExceeded",
    "LLMEngine",
    "RejectedCompletion",
    "Usage",
]


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

    @property
    def usage(self) -> Usage:
        """The tokens of this completion, billed to ``model``."""
        return Usage(self.model, self.prompt_tokens, self.completion_tokens)


@dataclass(slots=True)
class Usage:
    """The tokens one engine call used (what a provider bills).

    Not frozen: one is built per engine call on the LLM stage's hot path, and a frozen
    dataclass's ``__init__`` costs three times as much (``object.__setattr__`` per field).
    Treat it as a value all the same: nothing changes one once built.

    Attributes:
        model: The model billed: the one the provider reported, else the one asked.
        prompt_tokens: Tokens of the prompt (>= 0).
        completion_tokens: Tokens of the completion (>= 0).
    """

    model: str
    prompt_tokens: int
    completion_tokens: int


class RejectedCompletion(EngineError):
    """The provider answered, and billed ``usage``, but the answer is not usable.

    E.g. a blank reply, a reply cut off by ``max_tokens`` before any text
    (``finish_reason: "length"``), a refusal or a reply withheld by the content filter. Raised
    instead of a plain ``EngineError`` when the response carried a ``usage`` block, so the
    caller can count the tokens paid for; ``retriable`` says whether to ask again, as for any
    ``EngineError``.

    Attributes:
        usage: The tokens the response reported.
    """

    def __init__(self, message: str, *, retriable: bool, usage: Usage) -> None:
        super().__init__(message, retriable=retriable)
        self.usage = usage


class ContextLengthExceeded(EngineError):
    """The provider refused the prompt: prompt plus ``max_tokens`` exceed the model's context.

    OpenAI answers HTTP 400 with an error object (OpenAI API reference, ``ErrorObject``:
    ``code``, ``message``, ``param``, ``type``; ``openai.types.shared.ErrorObject`` in the
    client) of code ``context_length_exceeded``; the body as reported from api.openai.com
    (e.g. github.com/crewAIInc/crewAI-examples/issues/121)::

        {"error": {"message": "This model's maximum context length is 8192 tokens. However,
        your messages resulted in 8227 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}

    Some OpenAI-compatible servers send the same message with another ``code`` (DeepSeek:
    ``invalid_request_error``, github.com/evalstate/fast-agent/issues/621).
    Never retriable as it is: the same prompt fails again; a shorter one may pass (see
    ``streams.agents.llm``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


@dataclass(slots=True)
class CallRecord:
    """One call of an engine (one attempt), as ``ResilientEngine`` reports it to ``on_call``.

    Not frozen, as :class:`Usage` (built per call); do not change one.

    Attributes:
        duration_s: Seconds from the call's start to its answer, error or timeout; waits for
            the rate limiter and backoff sleeps between attempts are not part of it.
        usage: The tokens the call used when known: the completion's, or those reported with a
            completion that was rejected (:class:`RejectedCompletion`); None when the call got
            no completion (an HTTP error, a timeout, a malformed body).
        error: What the call raised (a timeout as ``EngineError``), or None when it answered.
    """

    duration_s: float
    usage: Usage | None
    error: BaseException | None = None


class LLMEngine(ABC):
    """Produces one completion per call. Raise ``connectors.errors.EngineError`` on failure."""

    name: str = "engine"

    @abstractmethod
    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook with a default
        """Release clients. The default does nothing."""
