"""Retries, a per-call timeout and the provider rate limit around any LLM engine."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from connectors.errors import EngineError
from connectors.llm.base import (
    CallRecord,
    Completion,
    CompletionRequest,
    LLMEngine,
    RejectedCompletion,
    Usage,
)
from connectors.llm.local import estimate_tokens
from connectors.llm.ratelimit import ProviderRateLimiter
from processors.backoff import backoff_delay
from processors.config import EngineConfig

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "OnCall",
    "ResilientEngine",
    "attempts_of",
    "estimate_call_tokens",
]

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 256
"""Completion tokens assumed for the rate limit when neither request nor config caps them."""

OnCall = Callable[[CallRecord], None]
"""Told of each call of the inner engine as it ends (see :class:`ResilientEngine`)."""


def estimate_call_tokens(request: CompletionRequest, cfg: EngineConfig) -> int:
    """Tokens a call may use: the estimate of each prompt message
    (``connectors.llm.local.estimate_tokens``) plus the completion cap.

    The cap is ``request.max_tokens``, else ``cfg.max_tokens``, else
    ``DEFAULT_COMPLETION_TOKENS``.
    """
    prompt = sum(estimate_tokens(m.content) for m in request.messages)
    return prompt + (request.max_tokens or cfg.max_tokens or DEFAULT_COMPLETION_TOKENS)


def attempts_of(error: BaseException) -> int:
    """Attempts made before ``error`` was raised by :class:`ResilientEngine` (1 if unknown)."""
    attempts = getattr(error, "attempts", 1)
    return attempts if isinstance(attempts, int) else 1


def _with_attempts(error: EngineError, attempts: int) -> EngineError:
    error.attempts = attempts  # type: ignore[attr-defined]  # ConnectorError is shared; additive
    return error


def _deadline_passed(attempt: int) -> EngineError:
    """The error of a chain whose budget was spent before attempt ``attempt + 1`` started."""
    spent = EngineError(
        f"gave up after {attempt} attempts: the turn's deadline passed before "
        f"attempt {attempt + 1} could start",
        retriable=False,
        deadline_passed=True,
    )
    return _with_attempts(spent, attempt)


class ResilientEngine(LLMEngine):
    """Wraps an engine with the call policy of its :class:`EngineConfig`.

    Each attempt first waits for the ``limiter`` (if any) with an estimated
    :func:`estimate_call_tokens`, then calls ``inner.complete`` bounded by
    ``asyncio.timeout(cfg.timeout_s)`` (expiry is a retriable ``EngineError``). Retriable errors
    are retried up to ``cfg.max_retries`` times after
    ``processors.backoff.backoff_delay`` (full jitter, never sooner than the error's
    ``retry_after``); an error with ``retry_after`` (a 429's ``Retry-After``) also pauses the
    shared limiter, so every call to the provider slows down, not only this one; a 429 without
    ``Retry-After`` (``EngineError.rate_limited``) pauses it for the retry's own backoff. After
    an answer, or a ``RejectedCompletion`` (tokens billed for an answer not used), the tokens
    the provider reported beyond the estimate are charged to the limiter
    (``ProviderRateLimiter.settle``). A
    ``Retry-After`` longer than ``cfg.max_retry_after_s`` ends the retries at once (the pause is
    capped at that too): a provider asking for an hour is down for this turn's purposes.
    Non-retriable errors are raised at once.

    Every ``EngineError`` raised carries ``attempts`` (read it with :func:`attempts_of`); after
    the last retry it is a new ``EngineError("gave up after N attempts: ...",
    retriable=False)`` chained to the last failure (``__cause__``).

    Each call of ``inner.complete`` (one attempt) is timed on its own, from its start to its
    answer, error or timeout (``time.perf_counter``), and reported to the ``on_call`` of
    :meth:`complete_with_attempts` as a ``CallRecord`` with the tokens it used when known:
    the provider's latency, without the waits for the limiter or the backoff sleeps.

    Args:
        inner: The engine doing the calls; its ``name`` is this engine's name.
        cfg: ``timeout_s``, ``max_retries``, ``backoff_initial_s``, ``backoff_max_s`` (s).
        limiter: The provider's shared rate limiter, or None for no limit.
        rng: Randomness of the jitter (seed one in tests).
        sleep: Awaitable sleep of the backoff (s); tests may pass a recording one.
    """

    def __init__(
        self,
        inner: LLMEngine,
        cfg: EngineConfig,
        *,
        limiter: ProviderRateLimiter | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = inner.name
        self._inner = inner
        self._cfg = cfg
        self._limiter = limiter
        self._rng = rng
        self._sleep = sleep

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request``, retrying as configured (see :meth:`complete_with_attempts`)."""
        completion, _ = await self.complete_with_attempts(request)
        return completion

    async def _attempt(
        self, request: CompletionRequest, tokens: int, on_call: OnCall | None
    ) -> Completion:
        """One call of the inner engine within ``cfg.timeout_s``, timed and reported.

        Raises:
            EngineError: The inner engine's, or a retriable one for the timeout.
            Exception: Whatever else the inner engine raised (reported too).
        """
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                completion = await self._inner.complete(request)
        except TimeoutError as exc:
            expired = EngineError(
                f"{self.name}: no completion within {self._cfg.timeout_s} s", retriable=True
            )
            self._ended(started, tokens, None, expired, on_call)
            raise expired from exc
        except Exception as exc:
            usage = exc.usage if isinstance(exc, RejectedCompletion) else None
            self._ended(started, tokens, usage, exc, on_call)
            raise
        self._ended(started, tokens, completion.usage, None, on_call)
        return completion

    def _ended(
        self,
        started: float,
        tokens: int,
        usage: Usage | None,
        error: BaseException | None,
        on_call: OnCall | None,
    ) -> None:
        """Settle a call's reported tokens with the limiter and report the call.

        An exception of ``on_call`` is logged and dropped: the call's completion (or error)
        is what the caller gets, not the callback's failure.
        """
        duration_s = time.perf_counter() - started
        if usage is not None and self._limiter is not None:
            self._limiter.settle(tokens, usage.prompt_tokens + usage.completion_tokens)
        if on_call is not None:
            try:
                on_call(CallRecord(duration_s, usage, error))
            except Exception:  # a broken report must not fail (or un-fail) the call itself
                logger.exception("%s: on_call raised; the call's outcome stands", self.name)

    async def complete_with_attempts(
        self,
        request: CompletionRequest,
        *,
        budget_s: float | None = None,
        on_call: OnCall | None = None,
    ) -> tuple[Completion, int]:
        """Answer ``request`` and say how many attempts it took.

        Args:
            request: The prompt.
            budget_s: Seconds the turn may still take (until its ``deadline_at``), or None for
                no limit. No attempt starts once the budget is spent: checked before waiting
                for the rate limiter (a budget already spent, e.g. 0 or negative, waits for
                nothing) and again after that wait; and a retry is not started when its
                backoff would end past it: the conversation stage re-issues the turn then, and
                a second chain of calls would only double the provider's load.
            on_call: Called once per attempt as it ends, answered or failed, with its
                ``CallRecord`` (duration in s, tokens when known, error); not called for an
                attempt that never started (budget spent) or that was cancelled. Whatever it
                raises is logged and ignored.

        Returns:
            ``(completion, attempts)``, attempts from 1 to ``cfg.max_retries + 1``.

        Raises:
            EngineError: Non-retriable (raised at once), or given up (``retriable=False``,
                message "gave up after N attempts: ..."): retries exhausted, a
                ``Retry-After`` longer than ``cfg.max_retry_after_s``, or the budget spent
                (``deadline_passed`` set). Either way with an ``attempts`` attribute (0 when
                the budget was spent before the first attempt).
        """
        cfg = self._cfg
        tokens = estimate_call_tokens(request, cfg)
        attempts = cfg.max_retries + 1
        give_up_at = None if budget_s is None else time.monotonic() + budget_s
        why = ""
        deadline_passed = False
        for attempt in range(attempts):
            # The budget is checked before waiting for the limiter (a spent budget takes no
            # slot and waits for none) and again after the wait, which may have spent it.
            if give_up_at is not None and time.monotonic() >= give_up_at:
                raise _deadline_passed(attempt)
            if self._limiter is not None:
                await self._limiter.acquire(tokens)
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    raise _deadline_passed(attempt)
            try:
                completion = await self._attempt(request, tokens, on_call)
            except EngineError as exc:
                if not exc.retriable:
                    _with_attempts(exc, attempt + 1)
                    raise
                last = exc
            else:
                return completion, attempt + 1
            made = attempt + 1
            asked = last.retry_after
            delay = backoff_delay(
                attempt,
                initial_s=cfg.backoff_initial_s,
                max_s=cfg.backoff_max_s,
                rng=self._rng,
                retry_after_s=asked,
            )
            if self._limiter is not None and (asked is not None or last.rate_limited):
                # A 429 without Retry-After pauses everyone for this call's own backoff.
                self._limiter.penalize(
                    min(delay if asked is None else asked, cfg.max_retry_after_s)
                )
            if asked is not None and asked > cfg.max_retry_after_s:
                cap = cfg.max_retry_after_s
                why = f" (the provider asks to wait {asked:.0f} s, more than {cap:g} s)"
                break
            if made == attempts:
                break
            if give_up_at is not None and time.monotonic() + delay >= give_up_at:
                why = f" (a retry in {delay:.3f} s would pass the turn's deadline)"
                deadline_passed = True
                break
            logger.warning(
                "%s attempt %d/%d failed (%s); retrying in %.3f s",
                self.name,
                made,
                attempts,
                last,
                delay,
            )
            await self._sleep(delay)
        error = EngineError(
            f"gave up after {made} attempts: {last}{why}",
            retriable=False,
            retry_after=last.retry_after,
            deadline_passed=deadline_passed,
        )
        raise _with_attempts(error, made) from last

    async def aclose(self) -> None:
        """Close the inner engine."""
        await self._inner.aclose()
