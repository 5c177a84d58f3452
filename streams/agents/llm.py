"""The LLM agent: builds the persona's prompt and asks its engines, first to last."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from connectors.errors import EngineError
from connectors.llm.base import Completion, CompletionRequest
from connectors.llm.resilient import DEFAULT_COMPLETION_TOKENS, attempts_of
from processors.business_rules import Decline, Escalate, check_turn, finalize_reply
from processors.config import PersonaConfig
from processors.preprocess import conversation_key
from processors.pricing import cost_usd
from processors.prompt import build_messages
from processors.tokens import trim_to_budget
from schemas.errors import DecodeError
from schemas.models import (
    LLMRequest,
    LLMResponse,
    LLMStatus,
    Role,
    utcnow,
)
from streams.agents.common import RawMessage, dead_letter, internal_error, send_record
from streams.metrics import (
    DROPPED,
    LLM_COST,
    LLM_IN_FLIGHT,
    LLM_LATENCY,
    LLM_OUTCOMES,
    LLM_TOKENS,
    RECORDS_IN,
    STAGE_ERRORS,
    child,
)
from streams.pool import CallPool
from streams.runtime import Runtime
from streams.transport import BatchConsumer, is_transient

__all__ = ["answer", "stage"]

log = logging.getLogger(__name__)
STAGE = "llm"


def _persona(rt: Runtime, name: str) -> PersonaConfig:
    """The named persona, or the default one when the config no longer has it."""
    found = rt.config.personas.get(name)
    return found if found is not None else rt.config.personas[rt.config.routing.default_persona]


def _response(
    request: LLMRequest, status: LLMStatus, content: str, engine: str, **fields: Any
) -> LLMResponse:
    return LLMResponse(
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        tenant=request.tenant,
        turn_id=request.turn_id,
        persona=request.persona,
        status=status,
        content=content,
        engine=engine,
        created_at=utcnow(),
        **fields,
    )


async def answer(rt: Runtime, request: LLMRequest) -> LLMResponse | None:
    """Answer one request as its persona.

    Business rules first (an escalation trigger hands the turn to a human, a forbidden topic
    gets the fallback reply without an engine call); then the persona's engines in order, each
    with its own timeouts, retries and rate limits (``ResilientEngine``); when every engine
    fails, the apology reply or a handoff, as ``llm.on_failure`` says.

    Attempts below ``llm.answer_from_attempt`` keep to the turn's ``deadline_at``: a request
    already past it when it is taken (it waited in the topic, the pool or the rate limiter) is
    not sent to any engine, and a chain of retries that would run past it stops. Either way
    nothing is answered: the conversation stage has re-issued, or is about to re-issue, the
    turn with a doubled deadline, and that attempt owns it. Without this, a backlog longer
    than the deadline paid the provider for every stale attempt as well as for its re-issue,
    which fed the backlog; and a stale attempt's first 429 became an apology that won the turn
    over the re-issue's answer. Later attempts ignore the deadline, so a turn is answered in
    the end even by a provider that is down for good. Counted in
    ``switchboard_dropped_total{stage="llm",reason="expired"|"deadline"}``.

    Returns:
        The response, or None when the deadline ended the attempt (see above). An escalated
        response (status ``escalated``, ``error`` saying why) makes the conversation stage hand
        the turn to the humans' handoff topic, if it wins the turn
        (``processors.conversation.on_llm_response``).
    """
    keeps_deadline = request.attempt < rt.config.llm.answer_from_attempt
    budget_s = _budget_s(request) if keeps_deadline else None
    if budget_s is not None and budget_s <= 0:
        child(DROPPED, STAGE, "expired").inc()
        log.info(
            "request %s not sent to an engine: its deadline passed %.1f s ago (re-issued)",
            request.request_id,
            -budget_s,
        )
        return None
    persona = _persona(rt, request.persona)
    user_content = _user_content(request)
    verdict = check_turn(persona, user_content)
    if isinstance(verdict, Escalate):
        child(LLM_OUTCOMES, request.persona, "rules", "escalated").inc()
        reason = f"escalation trigger {verdict.trigger!r}"
        reply = finalize_reply(persona, persona.handoff_reply)
        return _response(request, LLMStatus.ESCALATED, reply, "rules", error=reason, attempts=0)
    if isinstance(verdict, Decline):
        child(LLM_OUTCOMES, request.persona, "rules", "ok").inc()
        reply = finalize_reply(persona, persona.fallback_reply)
        return _response(
            request, LLMStatus.OK, reply, "rules", finish_reason="declined", attempts=0
        )
    history = request.messages[:-1]
    prompt = build_messages(
        persona, history, user_content, rt.config.conversation.max_history_turns
    )
    errors: list[str] = []
    attempts = 0
    for engine_name in persona.engines:
        engine, engine_cfg = rt.engines[engine_name], rt.config.engines[engine_name]
        model = persona.models.get(engine_name) or persona.model or engine_cfg.model
        max_tokens = persona.max_tokens or engine_cfg.max_tokens
        temperature = (
            persona.temperature if persona.temperature is not None else engine_cfg.temperature
        )
        reserve = max_tokens or DEFAULT_COMPLETION_TOKENS
        messages = trim_to_budget(
            prompt,
            budget_tokens=engine_cfg.context_tokens,
            reserve_tokens=reserve,
            model=model,
        )
        if user_content and not messages[-1].content:
            errors.append(f"{engine_name}: the prompt leaves no room for the user's message")
            log.warning(
                "engine %s skipped for %s: context_tokens %d minus the reply's %d tokens "
                "leaves no room for the user's message",
                engine_name,
                request.request_id,
                engine_cfg.context_tokens,
                reserve,
            )
            continue
        started = time.perf_counter()
        try:
            completion, used = await engine.complete_with_attempts(
                CompletionRequest(
                    persona_id=request.persona,
                    persona=persona,
                    messages=messages,
                    model=model,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    metadata=request.metadata,
                ),
                budget_s=_budget_s(request) if keeps_deadline else None,
            )
        except EngineError as exc:
            if exc.deadline_passed:
                child(DROPPED, STAGE, "deadline").inc()
                log.info("request %s stopped at its deadline: %s", request.request_id, exc)
                return None
            attempts += attempts_of(exc)
            child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
            errors.append(f"{engine_name}: {exc}")
            log.warning("engine %s failed for %s: %s", engine_name, request.request_id, exc)
            continue
        except Exception as exc:  # an engine bug or a client error it did not map
            attempts += 1
            child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
            errors.append(f"{engine_name}: unexpected {type(exc).__name__}: {exc}")
            log.exception("engine %s raised for %s", engine_name, request.request_id)
            continue
        attempts += used
        elapsed = time.perf_counter() - started
        cost = cost_usd(
            completion.model,
            completion.prompt_tokens,
            completion.completion_tokens,
            rt.config.llm.prices,
        )
        _record_usage(request, engine_name, completion, elapsed, cost)
        return _response(
            request,
            LLMStatus.OK,
            finalize_reply(persona, completion.content),
            engine_name,
            model=completion.model,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            latency_ms=elapsed * 1000.0,
            cost_usd=cost,
            attempts=attempts,
        )
    return _failed(
        rt, request, "; ".join(errors) or "no engine configured", LLMStatus.FALLBACK, attempts
    )


def _budget_s(request: LLMRequest) -> float | None:
    """Seconds until the request's ``deadline_at`` (negative when past), or None."""
    if request.deadline_at is None:
        return None
    return (request.deadline_at - utcnow()).total_seconds()


def _user_content(request: LLMRequest) -> str:
    last = request.messages[-1] if request.messages else None
    return last.content if last is not None and last.role == Role.USER else ""


def _failed(
    rt: Runtime, request: LLMRequest, error: str, status: LLMStatus, attempts: int
) -> LLMResponse:
    """The answer to a turn no engine answered: a handoff when ``llm.on_failure`` is
    ``handoff``, else the persona's apology with ``status`` (``fallback`` after the engines
    failed, ``failed`` after an unexpected error)."""
    persona = _persona(rt, request.persona)
    if rt.config.llm.on_failure == "handoff":
        child(LLM_OUTCOMES, request.persona, "none", "escalated").inc()
        reply = finalize_reply(persona, persona.handoff_reply)
        return _response(
            request,
            LLMStatus.ESCALATED,
            reply,
            "none",
            error=f"no answer: {error}",
            attempts=attempts,
        )
    child(LLM_OUTCOMES, request.persona, "none", status.value).inc()
    reply = finalize_reply(persona, persona.apology_reply)
    return _response(request, status, reply, "none", error=error, attempts=attempts)


def _record_usage(
    request: LLMRequest, engine: str, completion: Completion, elapsed_s: float, cost: float
) -> None:
    child(LLM_OUTCOMES, request.persona, engine, "ok").inc()
    child(LLM_LATENCY, engine).observe(elapsed_s)
    labels = (request.tenant, request.persona, engine)
    child(LLM_TOKENS, *labels, "prompt").inc(completion.prompt_tokens)
    child(LLM_TOKENS, *labels, "completion").inc(completion.completion_tokens)
    child(LLM_COST, request.tenant, request.persona, completion.model).inc(cost)


async def _handle(rt: Runtime, topics: dict[str, str], message: RawMessage) -> None:
    child(RECORDS_IN, STAGE).inc()
    try:
        request = rt.codec.decode(message.value or b"", LLMRequest)
    except DecodeError as exc:
        await dead_letter(
            rt,
            topics["deadletter"],
            message,
            stage="llm.decode",
            reason=exc.reason,
            error_type=exc.error_type,
        )
        return
    response = await answer(rt, request)
    if response is not None:
        await _send_answer(rt, topics, message, response)


async def _send_answer(
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    response: LLMResponse,
) -> None:
    """Send a turn's response, keyed by conversation, and watch its acknowledgement.

    The calls run outside any batch (their batch was committed once they started), so no
    batch awaits this acknowledgement: :func:`_acknowledged` does.
    """
    key = conversation_key(response.tenant, response.conversation_id)
    ack = await send_record(
        rt, topics["llm_responses"], response, key=key, stage=STAGE, parent=message
    )
    if isinstance(ack, asyncio.Future):
        ack.add_done_callback(partial(_acknowledged, rt, response.request_id))


def _acknowledged(rt: Runtime, request_id: str, ack: asyncio.Future[Any]) -> None:
    """Count and log an LLM response the broker did not acknowledge.

    A transient error (e.g. a leader moving) loses this response only: the turn is re-issued
    after its deadline. Any other error (the topic not writable, the record refused) would
    lose every response while the provider is still paid for each call, so it stops the
    worker (``Runtime.fail``), as a batch that cannot be written stops the other stages.
    """
    if ack.cancelled():
        return
    exc = ack.exception()
    if exc is None:
        return
    child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
    if is_transient(exc):
        log.warning(
            "the response to %s was not acknowledged (%r); the turn is re-issued after its "
            "deadline",
            request_id,
            exc,
        )
        return
    log.error("the response to %s was refused: %r; stopping the worker", request_id, exc)
    rt.fail(exc)


async def _fail_turn(
    rt: Runtime, topics: dict[str, str], message: RawMessage, exc: Exception
) -> None:
    """Dead-letter a request that failed unexpectedly, and still answer its turn.

    Without an answer the turn would stay pending: re-issued and failing again at every
    deadline while the conversation's later turns wait behind it. The user gets the persona's
    apology reply instead, recorded as a ``failed`` LLMResponse with the error, or the turn is
    handed off when ``llm.on_failure`` is ``handoff``.
    """
    try:
        await internal_error(rt, topics, message, exc, stage=STAGE)
    except Exception:  # transient: the request is re-issued after its deadline
        log.exception("could not dead-letter a failed LLM request")
        return
    try:
        request = rt.codec.decode(message.value or b"", LLMRequest)
    except DecodeError:
        return  # not a request: nothing to answer
    response = _failed(rt, request, f"{type(exc).__name__}: {exc}", LLMStatus.FAILED, attempts=0)
    await _send_answer(rt, topics, message, response)


def stage(rt: Runtime, topics: dict[str, str]) -> BatchConsumer:
    """The LLM stage: consumes the LLM requests topic and answers up to ``llm.max_in_flight``
    requests concurrently in one worker.

    No two requests in flight belong to the same conversation (the conversation stage keeps
    at most one turn per conversation in flight), so their completion order does not matter.

    The calls run in a ``streams.pool.CallPool``: a call that finished takes the next waiting
    request at once, in the same step of the event loop, so calls do not start and end in
    bursts. When every slot is busy, at most ``max(16, max_in_flight // 4)`` requests wait in
    memory and the stage stops reading: backpressure, not buffering. A batch's offsets are committed
    once its requests have started or wait in memory; a request lost with a crashed worker is
    re-issued by the conversation stage once its deadline passes
    (``conversation.llm_deadline_s``), and a duplicate response is dropped there by turn id
    (ARCHITECTURE.md principle 5).
    """

    async def call(message: RawMessage) -> None:
        try:
            await _handle(rt, topics, message)
        except Exception as exc:  # a bad record must never stop the stage
            await _fail_turn(rt, topics, message, exc)

    pool: CallPool[RawMessage] = CallPool(
        rt.config.llm.max_in_flight,
        call,
        on_busy=LLM_IN_FLIGHT.set,
    )
    rt.llm_pool = pool  # drained by the worker on shutdown (streams.worker)

    async def start_calls(messages: list[RawMessage]) -> None:
        for message in messages:
            await pool.submit(message)

    return BatchConsumer(rt.settings, STAGE, [topics["llm_requests"]], start_calls)
