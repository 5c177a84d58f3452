"""``streams.agents.llm.answer`` on a real Runtime: what a turn gets when an engine misbehaves.

The engines are the bundled local engine and, where a test needs one, an engine that raises
something other than ``EngineError`` (an engine bug, or an HTTP-stack error a client did not
wrap), wrapped in the real ``ResilientEngine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import NotLeaderForPartitionError, TopicAuthorizationFailedError
from prometheus_client import REGISTRY

from connectors.errors import EngineError
from connectors.llm.base import Completion, CompletionRequest, LLMEngine
from connectors.llm.resilient import ResilientEngine, attempts_of
from schemas.models import ChatMessage, LLMRequest, LLMStatus, Role, utcnow
from streams.agents.llm import _acknowledged, answer
from streams.runtime import Runtime
from streams.settings import ConfigError, Settings, load_config
from streams.stack import config_variant

QUESTION = "My mouse is not responding."


class Broken(LLMEngine):
    """An engine whose every call raises ``RuntimeError`` (not an ``EngineError``)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        raise RuntimeError("TLS stream ended")


def runtime(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path), load_config(config_variant(tmp_path, change)))


def with_broken_engine(rt: Runtime) -> Broken:
    broken = Broken()
    rt.engines["gpt"] = ResilientEngine(broken, rt.config.engines["gpt"])
    return broken


def request(persona: str = "support") -> LLMRequest:
    now = utcnow()
    return LLMRequest(
        request_id="t1:0",
        conversation_id="c1",
        tenant="acme",
        turn_id="t1",
        persona=persona,
        messages=[ChatMessage(role=Role.USER, content=QUESTION)],
        created_at=now,
        deadline_at=now + timedelta(seconds=60),
    )


async def test_an_engine_raising_an_unexpected_error_falls_back_to_the_next(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {"kind": "local"}
        raw["personas"]["support"]["engines"] = ["gpt", "local"]

    rt = runtime(tmp_path, change)
    broken = with_broken_engine(rt)

    response = await answer(rt, request())

    assert broken.calls == 1
    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "local", 2)
    assert response.content == "Try plugging it into another USB port or changing the batteries."


async def test_an_unexpected_error_of_the_only_engine_is_handed_off_when_configured(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {"kind": "local"}
        raw["personas"]["support"]["engines"] = ["gpt"]
        raw["llm"] = {"on_failure": "handoff"}

    rt = runtime(tmp_path, change)
    with_broken_engine(rt)

    response = await answer(rt, request())

    assert response.status == LLMStatus.ESCALATED
    assert (response.error or "").startswith("no answer: ")
    assert "unexpected RuntimeError: TLS stream ended" in (response.error or "")
    assert response.content == rt.config.personas["support"].handoff_reply


async def test_an_engine_whose_context_leaves_no_room_for_the_user_is_skipped(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        # 256 tokens of context, 300 reserved for the reply: nothing left for the prompt
        raw["engines"]["tiny"] = {"kind": "local", "context_tokens": 256, "max_tokens": 300}
        raw["personas"]["support"]["engines"] = ["tiny", "local"]

    rt = runtime(tmp_path, change)

    response = await answer(rt, request())

    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "local", 1)


async def test_when_every_engine_is_skipped_the_turn_gets_the_apology_naming_why(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["tiny"] = {"kind": "local", "context_tokens": 256, "max_tokens": 300}
        raw["personas"]["support"]["engines"] = ["tiny"]

    rt = runtime(tmp_path, change)

    response = await answer(rt, request())

    assert response.status == LLMStatus.FALLBACK
    assert response.content == rt.config.personas["support"].apology_reply
    assert "no room for the user's message" in (response.error or "")


# --- the turn's deadline ------------------------------------------------------------------------


class Flaky(LLMEngine):
    """Fails its first ``failures`` calls with a 429 asking to wait ``retry_after_s``."""

    name = "flaky"

    def __init__(self, failures: int, retry_after_s: float) -> None:
        self.calls = 0
        self.failures = failures
        self.retry_after_s = retry_after_s

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        if self.calls <= self.failures:
            raise EngineError(
                "429 Too Many Requests",
                retriable=True,
                retry_after=self.retry_after_s,
                rate_limited=True,
            )
        return Completion(
            content="the real answer", model="m", prompt_tokens=3, completion_tokens=3
        )


def _dropped(reason: str) -> float:
    labels = {"stage": "llm", "reason": reason}
    return REGISTRY.get_sample_value("switchboard_dropped_total", labels) or 0.0


def _only_gpt(raw: dict[str, Any]) -> None:
    raw["engines"]["gpt"] = {"kind": "local"}
    raw["personas"]["support"]["engines"] = ["gpt", "local"]


def _with(rt: Runtime, engine: LLMEngine) -> None:
    rt.engines["gpt"] = ResilientEngine(engine, rt.config.engines["gpt"])


async def test_a_request_past_its_deadline_is_not_sent_to_any_engine(tmp_path: Path) -> None:
    # It waited in the topic, the pool or the rate limiter longer than its deadline: the
    # conversation stage has re-issued the turn. Before, the provider was called anyway (and
    # then again for the re-issue), which fed the backlog that made it late.
    rt = runtime(tmp_path, _only_gpt)
    flaky = Flaky(failures=0, retry_after_s=0)
    _with(rt, flaky)
    late = request().model_copy(update={"deadline_at": utcnow() - timedelta(seconds=1)})
    before = _dropped("expired")

    assert await answer(rt, late) is None

    assert flaky.calls == 0
    assert _dropped("expired") == before + 1


async def test_from_answer_from_attempt_on_the_deadline_no_longer_stops_the_turn(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path, _only_gpt)
    flaky = Flaky(failures=0, retry_after_s=0)
    _with(rt, flaky)
    late = request().model_copy(
        update={
            "deadline_at": utcnow() - timedelta(seconds=1),
            "attempt": rt.config.llm.answer_from_attempt,
        }
    )

    response = await answer(rt, late)

    assert response is not None
    assert (response.status, response.engine, response.content) == (
        LLMStatus.OK,
        "gpt",
        "the real answer",
    )
    assert flaky.calls == 1


async def test_a_429_whose_retry_would_pass_the_deadline_leaves_the_turn_to_its_reissue(
    tmp_path: Path,
) -> None:
    # Before: the chain gave up and the persona's apology (status fallback) was sent; as the
    # first response of the turn it beat the re-issue's real answer.
    rt = runtime(tmp_path, _only_gpt)
    flaky = Flaky(failures=1, retry_after_s=0.5)
    _with(rt, flaky)
    soon = request().model_copy(update={"deadline_at": utcnow() + timedelta(seconds=0.2)})
    before = _dropped("deadline")

    assert await answer(rt, soon) is None

    assert flaky.calls == 1  # the fallback engine is not asked either: the re-issue owns it
    assert _dropped("deadline") == before + 1

    _with(rt, Flaky(failures=1, retry_after_s=0.5))
    last = soon.model_copy(update={"attempt": rt.config.llm.answer_from_attempt})
    response = await answer(rt, last)  # the last attempts wait for the provider
    assert response is not None
    assert (response.status, response.content, response.attempts) == (
        LLMStatus.OK,
        "the real answer",
        2,
    )


async def test_no_attempt_starts_once_the_budget_is_spent(tmp_path: Path) -> None:
    rt = runtime(tmp_path, _only_gpt)
    flaky = Flaky(failures=0, retry_after_s=0)
    engine = ResilientEngine(flaky, rt.config.engines["gpt"])
    prompt = CompletionRequest(
        persona_id="support",
        persona=rt.config.personas["support"],
        messages=[ChatMessage(role=Role.USER, content=QUESTION)],
        model="m",
    )
    with pytest.raises(EngineError) as info:
        await engine.complete_with_attempts(prompt, budget_s=0.0)
    assert info.value.deadline_passed
    assert attempts_of(info.value) == 0
    assert flaky.calls == 0
    completion, attempts = await engine.complete_with_attempts(prompt, budget_s=5.0)
    assert (completion.content, attempts, flaky.calls) == ("the real answer", 1, 1)


# --- the response's acknowledgement -----------------------------------------------------------


async def test_a_response_refused_for_good_stops_the_worker_a_transient_one_does_not(
    tmp_path: Path,
) -> None:
    # The calls run outside any batch, so nobody awaited these acknowledgements: a topic the
    # worker may not write lost every response while the provider was paid for each call.
    rt = runtime(tmp_path, _only_gpt)
    loop = asyncio.get_running_loop()
    transient, refused = loop.create_future(), loop.create_future()
    transient.set_exception(NotLeaderForPartitionError())
    refused.set_exception(TopicAuthorizationFailedError())

    _acknowledged(rt, "t1:0", transient)
    assert not rt.failed.is_set()
    _acknowledged(rt, "t1:0", refused)
    assert rt.failed.is_set()
    assert isinstance(rt.failure, TopicAuthorizationFailedError)
    labels = {"stage": "llm", "error_type": "TopicAuthorizationFailedError"}
    assert (REGISTRY.get_sample_value("switchboard_stage_errors_total", labels) or 0) >= 1


class Recording(LLMEngine):
    """Records the model of each call; fails them all non-retriably when ``fail``."""

    def __init__(self, name: str, fail: bool) -> None:
        self.name = name
        self.fail = fail
        self.models: list[str | None] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.models.append(request.model)
        if self.fail:
            raise EngineError("404 model not found", retriable=False)
        return Completion(content=f"from {self.name}", model=request.model or "")


@pytest.mark.parametrize(
    ("persona_fields", "expected"),
    [
        ({"model": "gpt-4o"}, ["gpt-4o", "gpt-4o"]),  # model: every engine (documented)
        ({"models": {"gpt": "gpt-4o"}}, ["gpt-4o", "llama3"]),  # the fallback keeps its own
        ({"model": "x", "models": {"ollama": "llama3.1"}}, ["x", "llama3.1"]),
    ],
)
async def test_a_persona_model_per_engine_leaves_the_fallback_engine_its_own(
    tmp_path: Path, persona_fields: dict[str, Any], expected: list[str]
) -> None:
    # Before, a persona's model went to every engine: gpt-4o was sent to Ollama, which answers
    # 404, so the fallback engine never answered.
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {"kind": "local", "model": "gpt-4o-mini"}
        raw["engines"]["ollama"] = {"kind": "local", "model": "llama3"}
        raw["personas"]["support"]["engines"] = ["gpt", "ollama"]
        raw["personas"]["support"].update(persona_fields)

    rt = runtime(tmp_path, change)
    first, second = Recording("gpt", fail=True), Recording("ollama", fail=False)
    rt.engines["gpt"] = ResilientEngine(first, rt.config.engines["gpt"])
    rt.engines["ollama"] = ResilientEngine(second, rt.config.engines["ollama"])

    response = await answer(rt, request())

    assert response is not None
    assert (response.engine, response.content) == ("ollama", "from ollama")
    assert first.models + second.models == expected


def test_models_may_only_name_the_personas_own_engines(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["personas"]["support"]["models"] = {"ollama": "llama3"}

    with pytest.raises(ConfigError, match="'ollama' that are not among this persona's engines"):
        runtime(tmp_path, change)
