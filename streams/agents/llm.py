"""The LLM agent: builds the persona's prompt and asks its engines, first to last."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from connectors.errors import EngineError
from connectors.llm.base import Completion, CompletionRequest
from processors.prompt import build_messages
from schemas.errors import DecodeError
from schemas.models import LLMRequest, LLMResponse, LLMStatus, Role, utcnow
from streams.agents.common import RawMessage, dead_letter, send_record
from streams.metrics import LLM_IN_FLIGHT, LLM_LATENCY, LLM_TOKENS, RECORDS_IN, STAGE_ERRORS
from streams.runtime import Runtime

__all__ = ["answer", "register"]

log = logging.getLogger(__name__)
STAGE = "llm"


async def answer(rt: Runtime, request: LLMRequest) -> LLMResponse:
    """Answer one request with the persona's engines in order; an apology when all fail."""
    persona = rt.config.personas.get(request.persona)
    if persona is None:
        persona = rt.config.personas[rt.config.routing.default_persona]
    history, last = request.messages[:-1], request.messages[-1] if request.messages else None
    user_content = last.content if last is not None and last.role == Role.USER else ""
    messages = build_messages(
        persona, history, user_content, rt.config.conversation.max_history_turns
    )
    errors: list[str] = []
    for engine_name in persona.engines:
        engine = rt.engines[engine_name]
        engine_cfg = rt.config.engines[engine_name]
        started = time.perf_counter()
        try:
            completion: Completion = await engine.complete(
                CompletionRequest(
                    persona_id=request.persona,
                    persona=persona,
                    messages=messages,
                    model=engine_cfg.model,
                    temperature=engine_cfg.temperature,
                    max_tokens=engine_cfg.max_tokens,
                    metadata=request.metadata,
                )
            )
        except EngineError as exc:
            STAGE_ERRORS.labels(STAGE, type(exc).__name__).inc()
            errors.append(f"{engine_name}: {exc}")
            log.warning("engine %s failed for %s: %s", engine_name, request.request_id, exc)
            continue
        elapsed = time.perf_counter() - started
        LLM_LATENCY.labels(engine_name).observe(elapsed)
        LLM_TOKENS.labels(request.tenant, request.persona, engine_name, "prompt").inc(
            completion.prompt_tokens
        )
        LLM_TOKENS.labels(request.tenant, request.persona, engine_name, "completion").inc(
            completion.completion_tokens
        )
        return LLMResponse(
            request_id=request.request_id,
            conversation_id=request.conversation_id,
            tenant=request.tenant,
            turn_id=request.turn_id,
            persona=request.persona,
            status=LLMStatus.OK,
            content=completion.content,
            engine=engine_name,
            model=completion.model,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            latency_ms=elapsed * 1000.0,
            created_at=utcnow(),
        )
    return LLMResponse(
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        tenant=request.tenant,
        turn_id=request.turn_id,
        persona=request.persona,
        status=LLMStatus.FALLBACK,
        content=persona.apology_reply,
        engine="none",
        error="; ".join(errors) or "no engine configured",
        created_at=utcnow(),
    )


async def _handle(rt: Runtime, topics: dict[str, Any], message: RawMessage) -> None:
    RECORDS_IN.labels(STAGE).inc()
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
    await send_record(
        rt,
        topics["llm_responses"],
        response,
        key=request.conversation_id,
        stage=STAGE,
        parent=message,
    )


def register(app: Any, rt: Runtime, topics: dict[str, Any]) -> None:
    """Register the LLM agent on ``app`` (consumes the LLM requests topic).

    Up to ``llm.max_in_flight`` requests are answered concurrently by one worker. No two of
    them belong to the same conversation (the conversation agent keeps at most one turn per
    conversation in flight), so their completion order does not matter. When the pool is full
    the agent stops reading: backpressure, not buffering. Offsets may be committed while calls
    are still in flight; a request lost with a crashed worker is re-issued by the conversation
    agent once its deadline passes (``conversation.llm_deadline_s``), and a duplicate response
    is dropped there by turn id (ARCHITECTURE.md principle 5).
    """

    @app.agent(topics["llm_requests"], name="llm")  # type: ignore[untyped-decorator]  # faust decorators are untyped
    async def llm(stream: Any) -> None:
        await rt.start()
        slots = asyncio.Semaphore(rt.config.llm.max_in_flight)
        in_flight: set[asyncio.Task[None]] = set()

        async def run(message: RawMessage) -> None:
            try:
                await _handle(rt, topics, message)
            except Exception as exc:  # a bad record must never stop the stage
                STAGE_ERRORS.labels(STAGE, type(exc).__name__).inc()
                log.exception("llm failed on offset %s", message.offset)
                await dead_letter(
                    rt,
                    topics["deadletter"],
                    message,
                    stage="llm.internal",
                    reason=f"unexpected error: {exc!r}",
                    error_type=type(exc).__name__,
                )
            finally:
                slots.release()
                LLM_IN_FLIGHT.dec()

        try:
            async for event in stream.events():
                await slots.acquire()
                LLM_IN_FLIGHT.inc()
                task = asyncio.ensure_future(run(event.message))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()
