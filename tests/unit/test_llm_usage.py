"""What ``streams.agents.llm.answer`` records of its engine calls: tokens and cost per tenant,
persona, engine and model (billed answers that were rejected included), the latency of each
call, and the one retry with a shorter prompt after ``context_length_exceeded``.

The OpenAI engine is the real one (the ``openai`` client) against the loopback
``support.fake_openai.FakeOpenAI``, behind the real ``ResilientEngine``; the fallback engine is
the bundled local one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from support.fake_openai import FakeOpenAI, RecordedRequest
from support.records import consumed

from connectors.llm.openai_engine import OpenAIEngine
from connectors.llm.ratelimit import ProviderRateLimiter
from connectors.llm.resilient import ResilientEngine
from processors.prompt import build_messages
from schemas.models import ChatMessage, LLMRequest, LLMResponse, LLMStatus, Role, utcnow
from streams.agents import llm
from streams.agents.llm import answer
from streams.runtime import Runtime
from streams.settings import Settings, load_config
from streams.stack import config_variant

QUESTION = "My mouse is not responding."
LOCAL_ANSWER = "Try plugging it into another USB port or changing the batteries."
PROMPT_PER_1K, COMPLETION_PER_1K = 1.0, 2.0


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(retry_after=None) as fake:
        yield fake


def runtime(
    tmp_path: Path, server: FakeOpenAI, engines: list[str], *, model: str = "gpt-test"
) -> Runtime:
    """The bundled config; persona ``support`` asks ``engines`` (``gpt``: the fake server)."""

    def change(raw: dict[str, Any]) -> None:
        # kind local so that the Runtime needs no API key; the engine is replaced below
        raw["engines"]["gpt"] = {
            "kind": "local",
            "model": model,
            "max_retries": 2,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.02,
            "max_retry_after_s": 5,
            "timeout_s": 5,
        }
        raw["personas"]["support"]["engines"] = engines
        raw["llm"] = {
            "prices": {
                "gpt-test": {"prompt_per_1k": PROMPT_PER_1K, "completion_per_1k": COMPLETION_PER_1K}
            }
        }

    rt = Runtime(Settings(data_dir=tmp_path), load_config(config_variant(tmp_path, change)))
    cfg = rt.config.engines["gpt"]
    inner = OpenAIEngine(cfg, api_key=server.api_key, base_url=server.base_url)
    rt.engines["gpt"] = ResilientEngine(inner, cfg, limiter=ProviderRateLimiter.from_config(cfg))
    return rt


def request(tenant: str, *history: ChatMessage) -> LLMRequest:
    now = utcnow()
    return LLMRequest(
        request_id=f"{tenant}:0",
        conversation_id="c1",
        tenant=tenant,
        turn_id="t1",
        persona="support",
        messages=[*history, ChatMessage(role=Role.USER, content=QUESTION)],
        created_at=now,
        deadline_at=now + timedelta(seconds=60),
    )


async def answer_and_close(rt: Runtime, req: LLMRequest) -> LLMResponse:
    try:
        response = await answer(rt, req)
    finally:
        await rt.engines["gpt"].aclose()
    assert response is not None
    return response


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def tokens(tenant: str, engine: str, model: str, kind: str) -> float:
    labels = {"tenant": tenant, "persona": "support", "engine": engine, "model": model}
    return sample("switchboard_llm_tokens_total", **labels, kind=kind)


def cost(tenant: str, model: str) -> float:
    return sample("switchboard_llm_cost_usd_total", tenant=tenant, persona="support", model=model)


def billed(recorded: RecordedRequest) -> tuple[int, int]:
    """The usage the fake server reports for ``recorded``: ``ceil(chars / 4)`` of the prompt's
    messages and of its ``echo: <last user content>`` reply (also when it blanks the reply)."""
    messages = recorded.body["messages"]
    prompt = sum(math.ceil(len(m["content"]) / 4) for m in messages)
    return prompt, math.ceil(len(f"echo: {messages[-1]['content']}") / 4)


def price(prompt: int, completion: int) -> float:
    return (prompt * PROMPT_PER_1K + completion * COMPLETION_PER_1K) / 1000


# --- tokens by model ---------------------------------------------------------------------------


async def test_tokens_are_counted_by_tenant_persona_engine_and_model(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    rt = runtime(tmp_path, server, ["gpt", "local"])

    response = await answer_and_close(rt, request("usage-model"))

    assert (response.engine, response.model) == ("gpt", "gpt-test")
    (call,) = server.requests
    assert (response.prompt_tokens, response.completion_tokens) == billed(call)
    assert tokens("usage-model", "gpt", "gpt-test", "prompt") == response.prompt_tokens
    assert tokens("usage-model", "gpt", "gpt-test", "completion") == response.completion_tokens
    assert cost("usage-model", "gpt-test") == pytest.approx(price(*billed(call)))


# --- latency of each call ----------------------------------------------------------------------


async def test_latency_is_observed_per_call_without_the_retry_wait(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    # Before, one observation per answer, from the first attempt to the answer: the 0.4 s the
    # 429 asked to wait was counted as the provider's latency.
    server.faults.append("429:0.4")
    server.set_latency(0.05)
    rt = runtime(tmp_path, server, ["gpt", "local"])
    count_before = sample("switchboard_llm_latency_seconds_count", engine="gpt")
    sum_before = sample("switchboard_llm_latency_seconds_sum", engine="gpt")

    response = await answer_and_close(rt, request("usage-latency"))

    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "gpt", 2)
    assert sample("switchboard_llm_latency_seconds_count", engine="gpt") == count_before + 2
    observed = sample("switchboard_llm_latency_seconds_sum", engine="gpt") - sum_before
    assert 0.1 <= observed < 0.4  # two calls of >= 0.05 s each; the 0.4 s wait is not in it
    assert response.latency_ms >= 500  # the response's latency is the whole answer's


# --- billed answers that were rejected ---------------------------------------------------------


async def test_a_rejected_answer_that_reported_usage_is_counted_and_costed(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    # A blank reply cut off by max_tokens is not retried and the local engine answers; the
    # provider billed it all the same. Before, neither metrics nor the response counted it.
    server.faults.append("blank_length")
    rt = runtime(tmp_path, server, ["gpt", "local"])

    response = await answer_and_close(rt, request("usage-rejected"))

    assert (response.status, response.engine, response.content) == (
        LLMStatus.OK,
        "local",
        LOCAL_ANSWER,
    )
    (call,) = server.requests
    prompt, completion = billed(call)
    assert tokens("usage-rejected", "gpt", "gpt-test", "prompt") == prompt
    assert tokens("usage-rejected", "gpt", "gpt-test", "completion") == completion
    assert cost("usage-rejected", "gpt-test") == pytest.approx(price(prompt, completion))
    local_prompt = tokens("usage-rejected", "local", "local-kb", "prompt")
    local_completion = tokens("usage-rejected", "local", "local-kb", "completion")
    assert local_prompt > 0
    # The response covers every call of the turn: the rejected one and the local answer.
    assert response.prompt_tokens == prompt + local_prompt
    assert response.completion_tokens == completion + local_completion
    assert response.cost_usd == pytest.approx(price(prompt, completion))  # local-kb is free
    assert response.attempts == 2


async def test_a_retried_blank_reply_is_counted_with_the_answer(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.faults.append("blank_reply")
    rt = runtime(tmp_path, server, ["gpt", "local"])

    response = await answer_and_close(rt, request("usage-retried"))

    assert (response.engine, response.attempts) == ("gpt", 2)
    first, second = (billed(call) for call in server.requests)
    assert response.prompt_tokens == first[0] + second[0]
    assert response.completion_tokens == first[1] + second[1]
    assert response.cost_usd == pytest.approx(price(*first) + price(*second))
    assert tokens("usage-retried", "gpt", "gpt-test", "prompt") == first[0] + second[0]
    assert cost("usage-retried", "gpt-test") == pytest.approx(response.cost_usd)


async def test_the_apology_after_billed_failures_carries_their_cost(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.faults.append("content_filter")
    rt = runtime(tmp_path, server, ["gpt"])

    response = await answer_and_close(rt, request("usage-apology"))

    assert response.status == LLMStatus.FALLBACK
    assert response.content == rt.config.personas["support"].apology_reply
    (call,) = server.requests
    prompt, completion = billed(call)
    assert (response.prompt_tokens, response.completion_tokens) == (prompt, completion)
    assert response.cost_usd == pytest.approx(price(prompt, completion))
    assert cost("usage-apology", "gpt-test") == pytest.approx(price(prompt, completion))


async def test_failures_without_usage_count_no_tokens(tmp_path: Path, server: FakeOpenAI) -> None:
    server.faults.extend(["500", "500", "500"])
    rt = runtime(tmp_path, server, ["gpt"])

    response = await answer_and_close(rt, request("usage-none"))

    assert (response.status, response.attempts) == (LLMStatus.FALLBACK, 3)
    assert (response.prompt_tokens, response.completion_tokens, response.cost_usd) == (0, 0, 0.0)
    assert tokens("usage-none", "gpt", "gpt-test", "prompt") == 0


# --- context_length_exceeded -------------------------------------------------------------------


def history(turns: int, chars: int) -> list[ChatMessage]:
    roles = (Role.USER, Role.ASSISTANT)
    return [
        ChatMessage(role=roles[n % 2], content=f"{n:02d} " + "x" * (chars - 3))
        for n in range(turns)
    ]


def fake_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(math.ceil(len(m["content"]) / 4) for m in messages)


async def test_a_prompt_over_the_models_context_is_retried_once_with_less_history(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    # The engine's context_tokens (8192) is more than the model's real context: the provider
    # refuses the prompt. Before, that 400 failed the engine and the local engine answered.
    rt = runtime(tmp_path, server, ["gpt", "local"])
    past = history(8, 400)  # 100 tokens each
    # The model's context: system prompt and question (as the server counts them) plus half
    # of the history.
    pinned = build_messages(rt.config.personas["support"], [], QUESTION, 0)
    server.context_tokens = sum(math.ceil(len(m.content) / 4) for m in pinned) + 400

    response = await answer_and_close(rt, request("usage-context", *past))

    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "gpt", 2)
    refused, accepted = server.requests
    assert len(refused.body["messages"]) == 10  # system, 8 history messages, the question
    sent = accepted.body["messages"]
    assert sent[0] == refused.body["messages"][0]  # the system prompt, whole
    assert sent[-1] == {"role": "user", "content": QUESTION}  # the question, whole
    kept = sent[1:-1]
    assert 0 < len(kept) < 8
    assert [m["content"] for m in kept] == [m.content for m in past[len(past) - len(kept) :]]
    assert fake_tokens(sent) <= server.context_tokens
    assert response.prompt_tokens == billed(accepted)[0]  # the refused call billed nothing


async def test_a_second_refusal_falls_through_to_the_next_engine(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.faults.extend(["context_length_exceeded", "context_length_exceeded"])
    rt = runtime(tmp_path, server, ["gpt", "local"])

    response = await answer_and_close(rt, request("usage-context-twice", *history(6, 40)))

    assert (response.engine, response.content, response.attempts) == ("local", LOCAL_ANSWER, 3)
    first, second = server.requests
    assert len(second.body["messages"]) < len(first.body["messages"])


async def test_without_history_to_drop_the_refused_prompt_is_not_retried(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    server.faults.append("context_length_exceeded")
    rt = runtime(tmp_path, server, ["gpt", "local"])

    response = await answer_and_close(rt, request("usage-context-bare"))

    assert (response.engine, response.attempts) == ("local", 2)
    assert [r.fault for r in server.requests] == ["context_length_exceeded"]


# --- the model label: the model asked for -----------------------------------------------------


async def test_metrics_are_labelled_with_the_model_asked_for_not_the_one_reported(
    tmp_path: Path,
) -> None:
    # A provider reports a snapshot (or a gateway its routing, vLLM its served path): label
    # values it chooses. Before, those labelled the token and cost series.
    async with FakeOpenAI(retry_after=None, reported_model="gpt-test-2024-08-06") as server:
        rt = runtime(tmp_path, server, ["gpt", "local"])
        response = await answer_and_close(rt, request("usage-asked"))

    (call,) = server.requests
    assert call.body["model"] == "gpt-test"
    assert response.model == "gpt-test-2024-08-06"  # the response keeps the reported model
    assert tokens("usage-asked", "gpt", "gpt-test", "prompt") == response.prompt_tokens > 0
    assert tokens("usage-asked", "gpt", "gpt-test-2024-08-06", "prompt") == 0
    # priced by the reported model: gpt-test's price covers its dated snapshot
    assert cost("usage-asked", "gpt-test") == pytest.approx(price(*billed(call)))
    assert cost("usage-asked", "gpt-test-2024-08-06") == 0


async def test_without_a_configured_model_the_reported_one_labels_the_metrics(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    rt = runtime(tmp_path, server, ["local"], model="")

    response = await answer_and_close(rt, request("usage-unasked"))

    assert (response.engine, response.model) == ("local", "local-kb")
    assert tokens("usage-unasked", "local", "local-kb", "prompt") == response.prompt_tokens > 0


# --- a turn failing unexpectedly after its calls -----------------------------------------------

TOPICS = {"llm_requests": "llm-req", "llm_responses": "llm-resp", "deadletter": "dead"}


class RefusingProducer:
    """Records what is sent; refuses (``ValueError``) the first LLM response, as a broker
    refuses a record or an encoder a value."""

    max_request_size = 1_048_576

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.refused = 0

    def limit(self, topic: str) -> int:
        return self.max_request_size

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Any
    ) -> asyncio.Future[None]:
        if topic == TOPICS["llm_responses"] and not self.refused:
            self.refused += 1
            raise ValueError("record refused")
        self.sent.append((topic, value))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


async def test_a_failed_turn_carries_the_usage_of_the_calls_made_before_the_failure(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    # The answer was billed, then could not be sent. Before, the "failed" response that still
    # answers the turn said 0 attempts and no tokens.
    rt = runtime(tmp_path, server, ["gpt", "local"])
    producer = RefusingProducer()
    rt.kafka = producer  # type: ignore[assignment]
    consumer = llm.stage(rt, TOPICS)  # never started: the request is handed to its pool
    pool = rt.llm_pool
    assert pool is not None
    req = request("usage-failed")

    try:
        await pool.submit(consumed(TOPICS["llm_requests"], 0, 0, rt.codec.encode(req)))
        assert await pool.drain(5.0) == 0
    finally:
        await rt.engines["gpt"].aclose()
        await consumer.close()

    assert producer.refused == 1
    (call,) = server.requests
    (sent,) = [value for topic, value in producer.sent if topic == TOPICS["llm_responses"]]
    response = rt.codec.decode(sent, LLMResponse)
    assert response.status == LLMStatus.FAILED
    assert "record refused" in (response.error or "")
    assert response.attempts == 1
    assert (response.prompt_tokens, response.completion_tokens) == billed(call)
    assert response.cost_usd == pytest.approx(price(*billed(call)))
    assert response.latency_ms > 0
