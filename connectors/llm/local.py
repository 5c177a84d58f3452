"""The offline, deterministic local engine: answers from a persona's knowledge base."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from connectors.llm.base import Completion, CompletionRequest, LLMEngine
from processors.knowledge import KnowledgeBase
from processors.tokens import estimate_tokens
from schemas.models import Role

__all__ = ["LOCAL_MODEL", "LocalEngine", "estimate_tokens"]

logger = logging.getLogger(__name__)

LOCAL_MODEL = "local-kb"
"""The ``model`` of every local completion."""

# estimate_tokens (re-exported) is processors.tokens.estimate_tokens, the tokenizer-free
# estimate: the rate limiter's estimates, the counts of completions without usage and this
# engine's counts use it. The trimming (processors.tokens.count_tokens) uses it too unless
# tiktoken is installed and loads the model's encoding; then the two may differ.


class LocalEngine(LLMEngine):
    """Answer the last user message from the knowledge base named by the persona.

    A match returns its answer (``finish_reason="stop"``); no match, a persona without a
    knowledge base, or one naming a base that was not loaded returns the persona's
    ``fallback_reply`` (``finish_reason="fallback"``). Token counts are
    :func:`estimate_tokens` summed over the prompt messages and of the reply. The same request
    always gets the same completion.

    Args:
        knowledge_bases: Loaded knowledge bases by name (``config.knowledge_bases`` keys).
        latency_s: Seconds to sleep per call, to simulate a remote LLM in benchmarks.

    Raises:
        ValueError: If ``latency_s`` is negative.
    """

    name = "local"

    def __init__(
        self, knowledge_bases: Mapping[str, KnowledgeBase], latency_s: float = 0.0
    ) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self._knowledge_bases = dict(knowledge_bases)
        self._latency_s = latency_s
        self._warned: set[str] = set()

    def _knowledge_base(self, name: str | None) -> KnowledgeBase | None:
        if name is None:
            return None
        kb = self._knowledge_bases.get(name)
        if kb is None and name not in self._warned:
            self._warned.add(name)
            logger.warning("knowledge base %r is not loaded; answering with fallbacks", name)
        return kb

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request`` from the persona's knowledge base (never raises EngineError).

        Args:
            request: The prompt; only its last ``user`` message is looked up.

        Returns:
            The knowledge-base answer, or the persona's fallback reply.
        """
        if self._latency_s > 0:
            await asyncio.sleep(self._latency_s)
        persona = request.persona
        query = next((m.content for m in reversed(request.messages) if m.role is Role.USER), "")
        kb = self._knowledge_base(persona.knowledge_base)
        match = kb.best_answer(query) if kb is not None else None
        if match is not None:
            content, finish_reason = match.answer, "stop"
        else:
            content, finish_reason = persona.fallback_reply, "fallback"
        return Completion(
            content=content,
            model=LOCAL_MODEL,
            finish_reason=finish_reason,
            prompt_tokens=sum(estimate_tokens(m.content) for m in request.messages),
            completion_tokens=estimate_tokens(content),
        )
