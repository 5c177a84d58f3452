"""The LLM stage on a real worker, with the real openai client against a loopback server.

The worker process talks to an OpenAI-compatible server that this test runs and scripts with
faults; the assertions look at what users receive (delivery reports), what the provider saw
(requests recorded by the server) and what the pipeline accounted (LLMResponse records).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from support.fake_openai import FakeOpenAI
from support.stacks import new_stack
from support.topics import find_record

from schemas.models import AvroRecord, ConversationEvent, LLMResponse, LLMStatus
from streams.replay import Outcome, replay
from streams.settings import load_config
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration
R = TypeVar("R", bound=AvroRecord)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def provider() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(retry_after="0.3")
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture(scope="module")
def llm_stack(
    provider: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {
            "kind": "openai",
            "model": "gpt-test",
            "base_url": provider.base_url,
            "max_retries": 2,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            "timeout_s": 2,
            "max_retry_after_s": 1,
        }
        raw["personas"]["support"]["engines"] = ["gpt", "local"]
        raw["personas"]["support"]["escalation_triggers"] = ["speak to a human"]
        raw["personas"]["sales"]["engines"] = ["gpt"]
        raw["personas"]["sales"]["model"] = "gpt-sales"  # a persona's own model
        raw["llm"] = {"prices": {"gpt-test": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}}}

    stack = new_stack(
        tmp_path_factory.mktemp("llm-stack"),
        "llm",
        change,
        extra_env={"OPENAI_API_KEY": provider.api_key or ""},
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


async def _ask(stack: EmbeddedStack, content: str) -> Outcome:
    line = {
        "tenant": "llm",
        "channel": "chat",
        "sender": f"{uuid.uuid4().hex[:6]}@llm.test",
        "content": content,
    }
    result = await replay(
        stack.settings(), [line], timeout_s=60, on_progress=lambda *_: stack.check_workers()
    )
    (outcome,) = result.outcomes.values()
    assert outcome.report is not None, outcome.dead_letter
    return outcome


async def _response_to(stack: EmbeddedStack, outcome: Outcome) -> LLMResponse:
    """The LLMResponse the llm stage sent for ``outcome``'s turn."""
    return await find_record(
        stack,
        stack.settings().topics.llm_responses,
        LLMResponse,
        lambda r: r.turn_id == outcome.message.message_id,
    )


def _sent(provider: FakeOpenAI, content: str) -> list[Any]:
    return [r for r in provider.requests if r.body["messages"][-1]["content"] == content]


async def test_429_and_500_are_retried_then_answer_carries_usage_and_cost(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    provider.faults.extend(["429", "500"])
    content = "My mouse is not responding."
    outcome = await _ask(llm_stack, content)
    assert outcome.report is not None
    assert outcome.report.content == f"echo: {content}"
    requests = _sent(provider, content)
    assert [r.fault for r in requests] == ["429", "500", None]
    assert requests[1].received_at - requests[0].received_at >= 0.3  # Retry-After honoured
    headers = {k.lower(): v for k, v in requests[0].headers.items()}
    assert headers["authorization"] == f"Bearer {provider.api_key}"
    assert requests[0].body["model"] == "gpt-test"
    assert requests[0].body["messages"][0]["role"] == "system"
    response = await _response_to(llm_stack, outcome)
    assert response.status == LLMStatus.OK
    assert (response.engine, response.model, response.attempts) == ("gpt", "gpt-test", 3)
    assert response.prompt_tokens > 0
    assert response.completion_tokens > 0
    expected = (response.prompt_tokens * 1.0 + response.completion_tokens * 2.0) / 1000
    assert response.cost_usd == pytest.approx(expected)


async def test_request_that_cannot_succeed_falls_back_to_the_next_engine(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    provider.faults.append("400")
    content = "My internet is not working."
    outcome = await _ask(llm_stack, content)
    assert outcome.report is not None
    assert outcome.report.content == (
        "Restart your router and check if the cables are connected properly."
    )
    assert [r.fault for r in _sent(provider, content)] == ["400"]  # a 400 is not retried


async def test_a_retry_after_beyond_the_cap_falls_back_at_once_instead_of_stalling(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    provider.faults.append("429:3600")  # "come back in an hour"; the stack's cap is 1 s
    content = "I forgot my password."
    outcome = await _ask(llm_stack, content)
    assert outcome.report is not None
    assert [r.fault for r in _sent(provider, content)] == ["429:3600"]
    response = await _response_to(llm_stack, outcome)
    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "local", 2)
    assert outcome.report.content == response.content


async def test_persona_apologises_when_its_only_engine_keeps_failing(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    provider.faults.extend(["500", "timeout", "malformed"])
    content = "What is the price of the pro plan?"
    outcome = await _ask(llm_stack, content)
    sales = load_config(llm_stack.settings().config_path()).personas["sales"]
    assert outcome.report is not None
    assert outcome.report.persona == "sales"
    assert outcome.report.content == sales.apology_reply
    sent = _sent(provider, content)
    assert [r.fault for r in sent] == ["500", "timeout", "malformed"]
    assert {r.body["model"] for r in sent} == {"gpt-sales"}
    response = await _response_to(llm_stack, outcome)
    assert response.status == LLMStatus.FALLBACK
    assert "gave up after 3 attempts" in (response.error or "")


async def test_escalation_trigger_hands_the_turn_to_a_human_without_an_llm_call(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    content = "My laptop is broken, I want to speak to a human"
    outcome = await _ask(llm_stack, content)
    support = load_config(llm_stack.settings().config_path()).personas["support"]
    assert outcome.report is not None
    assert outcome.report.content == support.handoff_reply
    assert _sent(provider, content) == []
    handoff = await find_record(
        llm_stack,
        llm_stack.settings().topics.handoff,
        ConversationEvent,
        lambda e: e.conversation_id == outcome.report.conversation_id,  # type: ignore[union-attr]
    )
    assert handoff.kind.value == "handoff"
    assert handoff.content == content
    assert "speak to a human" in handoff.metadata["handoff.reason"]


async def test_worker_keeps_up_to_its_cap_of_256_calls_in_flight(
    llm_stack: EmbeddedStack, provider: FakeOpenAI
) -> None:
    # Well under the engine's 2 s timeout, so that no call is retried: the 256 replies of the
    # first wave arrive together, and a worker that has made no call yet needs a few hundred
    # ms to read them all. With 1.5 s this test failed when run on its own (3 of 3; a fresh
    # client, some calls retried after 2 s) and passed after the file's other tests.
    latency_s = 1.0
    provider.set_latency(latency_s)
    try:
        lines = [
            {
                "tenant": "llm",
                "channel": "chat",
                "sender": f"load-{i}@llm.test",
                "content": f"My mouse is not responding. (load {i})",
            }
            for i in range(400)
        ]
        result = await replay(
            llm_stack.settings(),
            lines,
            timeout_s=120,
            on_progress=lambda *_: llm_stack.check_workers(),
        )
    finally:
        provider.set_latency(0.0)
    assert result.summary()["replies_delivered"] == 400
    first_calls: dict[str, float] = {}  # each turn's first call: when this test's loop is
    for r in provider.requests:  # busy, a reply can reach the worker after its 2 s timeout,
        content = r.body["messages"][-1]["content"]  # and the call is retried (1 run in 2)
        if "(load " in content:
            first_calls.setdefault(content, r.received_at)
    starts = sorted(first_calls.values())
    assert len(starts) == 400
    # The server holds every call latency_s seconds: the most calls open at one instant is the
    # stage's concurrency. One-at-a-time would show 1; the cap (llm.max_in_flight) is 256.
    events = sorted([(t, 1) for t in starts] + [(t + latency_s, -1) for t in starts])
    open_calls = peak = 0
    for _, step in events:
        open_calls += step
        peak = max(peak, open_calls)
    assert 200 <= peak <= 256, peak
