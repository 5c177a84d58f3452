"""The LLM agent: builds the persona's prompt and asks its engines, first to last."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from functools import partial
from typing import Any

from connectors.errors import EngineError
from connectors.llm.base import CallRecord, Completion, CompletionRequest, ContextLengthExceeded
from connectors.llm.resilient import DEFAULT_COMPLETION_TOKENS
from processors.business_rules import (
    Decline,
    Escalate,
    check_turn,
    failure_reply,
    finalize_reply,
)
from processors.preprocess import conversation_key
from processors.pricing import cost_usd
from processors.prompt import build_messages
from processors.tokens import count_message_tokens, shed_history, trim_to_budget
from schemas.errors import DecodeError
from schemas.models import (
    ChatMessage,
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


@dataclasses.dataclass(slots=True)
class _TurnUsage:
    """What one request's engine calls used: counted in the metrics as each call ends, and
    summed for its LLMResponse.

    Engines are asked one after the other: :meth:`begin` names the engine (and the model it
    is asked for) whose calls :meth:`record` counts next.

    Attributes:
        rt: The runtime (``llm.prices``).
        request: The request answered (tenant and persona labels).
        started: ``time.perf_counter()`` when the turn began (s).
        engine: The engine asked now (config name): the ``engine`` label.
        model: The model it is asked for (``CompletionRequest.model``), '' for none: the
            ``model`` label (see :meth:`record`).
        calls: Engine calls made (attempts, over all engines and retries).
        prompt_tokens: Prompt tokens of the calls that reported usage.
        completion_tokens: Completion tokens of the same calls.
        cost_usd: Their cost from ``llm.prices`` (USD).
    """

    rt: Runtime
    request: LLMRequest
    started: float
    engine: str = ""
    model: str = ""
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def begin(self, engine: str, model: str) -> None:
        """Count the next calls as calls of ``engine`` asked for ``model``."""
        self.engine = engine
        self.model = model

    def record(self, call: CallRecord) -> None:
        """Count one call of the current engine: its duration in
        ``switchboard_llm_latency_seconds{engine}``, and when it reported usage its tokens and
        cost by tenant, persona, engine and model.

        The ``model`` label is the model asked for (persona or engine config), else the one
        the provider reported (the local engine's ``local-kb``): a bounded set, whereas a
        gateway or a vLLM server reports names of its own. The cost is priced by the
        reported model (``processors.pricing.cost_usd``; a dated snapshot such as
        ``gpt-4o-2024-08-06`` finds the price of ``gpt-4o``).
        """
        self.calls += 1
        engine = self.engine
        child(LLM_LATENCY, engine).observe(call.duration_s)
        usage = call.usage
        if usage is None:
            return
        tenant, persona = self.request.tenant, self.request.persona
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cost = cost_usd(usage.model, prompt, completion, self.rt.config.llm.prices)
        model = self.model or usage.model
        child(LLM_TOKENS, tenant, persona, engine, model, "prompt").inc(prompt)
        child(LLM_TOKENS, tenant, persona, engine, model, "completion").inc(completion)
        child(LLM_COST, tenant, persona, model).inc(cost)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += cost

    def fields(self) -> dict[str, Any]:
        """The LLMResponse fields of the turn so far (``latency_ms`` since ``started``)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 9),
            "latency_ms": (time.perf_counter() - self.started) * 1000.0,
            "attempts": self.calls,
        }


async def answer(
    rt: Runtime, request: LLMRequest, turn: _TurnUsage | None = None
) -> LLMResponse | None:
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

    A provider refusing the prompt as longer than the model's context
    (``ContextLengthExceeded``, OpenAI's ``context_length_exceeded``) gets a second request
    from the same engine with the history cut harder (:func:`_shorter_prompt`): a whole new
    chain of attempts, with its own retries (up to ``max_retries + 1`` more calls) and the
    turn's remaining deadline; if that chain fails too, the next engine answers.

    Every engine call is counted as it ends (retries, rejected answers and calls of a turn
    later dropped at its deadline included): its duration in
    ``switchboard_llm_latency_seconds{engine}`` and, when its response reported usage, its
    tokens and cost in ``switchboard_llm_tokens_total{tenant,persona,engine,model,kind}`` and
    ``switchboard_llm_cost_usd_total{tenant,persona,model}``, ``model`` being the model asked
    for (else the one reported; see ``_TurnUsage.record``).

    Args:
        rt: The runtime.
        request: The request.
        turn: Where the turn's calls are summed (the stage passes its own, to report the
            usage of a turn that then fails unexpectedly); None: a new one.

    Returns:
        The response, or None when the deadline ended the attempt (see above). An escalated
        response (status ``escalated``, ``error`` saying why) makes the conversation stage hand
        the turn to the humans' handoff topic, if it wins the turn
        (``processors.conversation.on_llm_response``). An engine's response (``ok``, or the
        apology / handoff after every engine failed) covers the whole turn: ``prompt_tokens``,
        ``completion_tokens`` and ``cost_usd`` sum every call of this request whose response
        reported usage, over all engines and retries, answers rejected included (what the
        provider bills for the turn; ``model`` names the answering model only); ``attempts``
        counts those calls and the ones without usage; ``latency_ms`` is the time ``answer``
        took (ms), rate-limiter waits, backoff and every engine included. A reply from the
        business rules made no call: zeros.
    """
    if turn is None:
        turn = _TurnUsage(rt, request, time.perf_counter())
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
    persona = rt.config.persona(request.persona)
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
    for engine_name in persona.engines:
        engine_cfg = rt.config.engines[engine_name]
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
        ask = CompletionRequest(
            persona_id=request.persona,
            persona=persona,
            messages=messages,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            metadata=request.metadata,
        )
        turn.begin(engine_name, model)
        try:
            completion = await _complete(rt, request, engine_name, ask, keeps_deadline, turn)
        except EngineError as exc:
            if exc.deadline_passed:
                child(DROPPED, STAGE, "deadline").inc()
                log.info("request %s stopped at its deadline: %s", request.request_id, exc)
                return None
            child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
            errors.append(f"{engine_name}: {exc}")
            log.warning("engine %s failed for %s: %s", engine_name, request.request_id, exc)
            continue
        except Exception as exc:  # an engine bug or a client error it did not map
            child(STAGE_ERRORS, STAGE, type(exc).__name__).inc()
            errors.append(f"{engine_name}: unexpected {type(exc).__name__}: {exc}")
            log.exception("engine %s raised for %s", engine_name, request.request_id)
            continue
        child(LLM_OUTCOMES, request.persona, engine_name, "ok").inc()
        return _response(
            request,
            LLMStatus.OK,
            finalize_reply(persona, completion.content),
            engine_name,
            model=completion.model,
            finish_reason=completion.finish_reason,
            **turn.fields(),
        )
    return _failed(
        rt, request, "; ".join(errors) or "no engine configured", LLMStatus.FALLBACK, turn.fields()
    )


async def _complete(
    rt: Runtime,
    request: LLMRequest,
    engine_name: str,
    ask: CompletionRequest,
    keeps_deadline: bool,
    turn: _TurnUsage,
) -> Completion:
    """Ask one engine, with its retries, and when the provider says the prompt exceeds the
    model's context, ask it again with a shorter prompt: a second ``complete_with_attempts``
    chain, retries included, within what is left of the turn's deadline.

    Raises:
        EngineError: The engine failed (the second chain's error included, or the first
            ``ContextLengthExceeded`` when no history is left to cut); anything else an
            engine raised.
    """
    engine = rt.engines[engine_name]
    on_call = turn.record
    try:
        completion, _ = await engine.complete_with_attempts(
            ask, budget_s=_budget_s(request) if keeps_deadline else None, on_call=on_call
        )
        return completion
    except ContextLengthExceeded as exc:
        shorter = _shorter_prompt(ask)
        if shorter is None:
            raise
        log.warning(
            "engine %s: the prompt of %s exceeds the model's context (%s); asking again "
            "with %d of its %d messages",
            engine_name,
            request.request_id,
            exc,
            len(shorter),
            len(ask.messages),
        )
    completion, _ = await engine.complete_with_attempts(
        dataclasses.replace(ask, messages=shorter),
        budget_s=_budget_s(request) if keeps_deadline else None,
        on_call=on_call,
    )
    return completion


def _shorter_prompt(ask: CompletionRequest) -> list[ChatMessage] | None:
    """The prompt of ``ask`` cut for a retry after the provider refused it as too long, or
    None when there is nothing to cut.

    The history is dropped, oldest first, until the prompt counts at most half the tokens
    (``processors.tokens.count_message_tokens``) of the prompt refused — at most half the
    engine's ``context_tokens`` budget, since that prompt was trimmed to it; half of the
    refused prompt rather than of the budget, because a refused prompt well within the budget
    (the estimate under-counted, or ``context_tokens`` is above the model's real context)
    would not shrink at all. The system prompt and the latest user message are kept whole
    (``processors.tokens.shed_history``), so without history there is no retry.
    """
    refused = count_message_tokens(ask.messages, ask.model)
    shorter = shed_history(ask.messages, limit_tokens=refused // 2, model=ask.model)
    return shorter if len(shorter) < len(ask.messages) else None


def _budget_s(request: LLMRequest) -> float | None:
    """Seconds until the request's ``deadline_at`` (negative when past), or None."""
    if request.deadline_at is None:
        return None
    return (request.deadline_at - utcnow()).total_seconds()


def _user_content(request: LLMRequest) -> str:
    last = request.messages[-1] if request.messages else None
    return last.content if last is not None and last.role == Role.USER else ""


def _failed(
    rt: Runtime, request: LLMRequest, error: str, status: LLMStatus, usage: dict[str, Any]
) -> LLMResponse:
    """The answer to a turn no engine answered: a handoff when ``llm.on_failure`` is
    ``handoff``, else the persona's apology with ``status`` (``fallback`` after the engines
    failed, ``failed`` after an unexpected error).

    ``usage`` holds the response's ``attempts``, token, cost and latency fields
    (``_TurnUsage.fields``)."""
    persona = rt.config.persona(request.persona)
    status, reply = failure_reply(persona, rt.config.llm.on_failure, status)
    child(LLM_OUTCOMES, request.persona, "none", status.value).inc()
    if status is LLMStatus.ESCALATED:
        error = f"no answer: {error}"
    return _response(request, status, reply, "none", error=error, **usage)


async def _handle(
    rt: Runtime, topics: dict[str, str], message: RawMessage, turns: list[_TurnUsage]
) -> None:
    """Decode, answer and send one request; its ``_TurnUsage`` is appended to ``turns`` once
    decoded, for :func:`_fail_turn` should anything then raise."""
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
    turn = _TurnUsage(rt, request, time.perf_counter())
    turns.append(turn)
    response = await answer(rt, request, turn)
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
    rt: Runtime,
    topics: dict[str, str],
    message: RawMessage,
    exc: Exception,
    turn: _TurnUsage | None = None,
) -> None:
    """Dead-letter a request that failed unexpectedly, and still answer its turn.

    Without an answer the turn would stay pending: re-issued and failing again at every
    deadline while the conversation's later turns wait behind it. The user gets the persona's
    apology reply instead, recorded as a ``failed`` LLMResponse with the error, or the turn is
    handed off when ``llm.on_failure`` is ``handoff``.

    The response's ``attempts``, token, cost and latency fields are those of ``turn``, the
    calls made before ``exc`` (e.g. an answer whose response could not be sent); zeros when
    the request failed before any (``turn`` None).
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
    error = f"{type(exc).__name__}: {exc}"
    usage = turn.fields() if turn is not None else {"attempts": 0}
    response = _failed(rt, request, error, LLMStatus.FAILED, usage)
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
        turns: list[_TurnUsage] = []  # the request's, once decoded
        try:
            await _handle(rt, topics, message, turns)
        except Exception as exc:  # a bad record must never stop the stage
            await _fail_turn(rt, topics, message, exc, turns[0] if turns else None)

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
