"""Tests of the retry, timeout and rate-limit policy around an engine (a scripted inner one)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from connectors.errors import EngineError
from connectors.llm.base import (
    CallRecord,
    Completion,
    CompletionRequest,
    LLMEngine,
    RejectedCompletion,
    Usage,
)
from connectors.llm.ratelimit import ProviderRateLimiter
from connectors.llm.resilient import (
    DEFAULT_COMPLETION_TOKENS,
    ResilientEngine,
    attempts_of,
    estimate_call_tokens,
)
from processors.backoff import backoff_delay
from processors.config import EngineConfig, PersonaConfig
from schemas.models import ChatMessage, Role

HANG = "hang"
Outcome = EngineError | str | None  # raise it / sleep far past any timeout / answer


class ScriptedEngine(LLMEngine):
    """Plays a script of outcomes per last message content; answers once a script runs out."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[Outcome]]) -> None:
        self.scripts = {key: list(outcomes) for key, outcomes in scripts.items()}
        self.calls: list[str] = []
        self.closed = False

    async def complete(self, request: CompletionRequest) -> Completion:
        key = request.messages[-1].content
        self.calls.append(key)
        script = self.scripts.get(key, [])
        outcome = script.pop(0) if script else None
        await asyncio.sleep(0)
        if isinstance(outcome, EngineError):
            raise outcome
        if outcome == HANG:
            await asyncio.sleep(60)
        return Completion(content=f"answer to {key}", model="scripted-1")

    async def aclose(self) -> None:
        self.closed = True


class RecordingSleep:
    """Records backoff delays without waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


class RecordingLimiter(ProviderRateLimiter):
    """A limiter without budgets that records what it was asked."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self.acquired: list[int] = []
        self.penalties: list[float] = []
        self.settled: list[tuple[int, int]] = []

    async def acquire(self, tokens: int) -> float:
        self.acquired.append(tokens)
        return await super().acquire(tokens)

    def penalize(self, retry_after_s: float) -> None:
        self.penalties.append(retry_after_s)

    def settle(self, estimated: int, actual: int) -> None:
        self.settled.append((estimated, actual))


def config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "kind": "openai",
        "timeout_s": 1.0,
        "max_retries": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.04,
    }
    values.update(overrides)
    return EngineConfig.model_validate(values)


def ask(content: str, **options: Any) -> CompletionRequest:
    return CompletionRequest(
        persona_id="ada",
        persona=PersonaConfig(name="Ada"),
        messages=[ChatMessage(role=Role.USER, content=content)],
        **options,
    )


def rate_limited(retry_after: float | None = None) -> EngineError:
    return EngineError("rate limited 429", retriable=True, retry_after=retry_after)


async def test_rate_limited_call_is_retried_then_answered() -> None:
    inner = ScriptedEngine({"hi": [rate_limited()]})
    engine = ResilientEngine(inner, config(), sleep=RecordingSleep())

    completion, attempts = await engine.complete_with_attempts(ask("hi"))

    assert completion.content == "answer to hi"
    assert attempts == 2
    assert inner.calls == ["hi", "hi"]


async def test_retry_waits_at_least_retry_after_and_pauses_the_shared_limiter() -> None:
    sleep, limiter = RecordingSleep(), RecordingLimiter()
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=0.5)]})
    engine = ResilientEngine(inner, config(), limiter=limiter, sleep=sleep)

    await engine.complete(ask("hi"))

    assert sleep.delays == [0.5]  # the jitter window (0.01 s) is far below Retry-After
    assert limiter.penalties == [0.5]


async def test_retry_after_is_honoured_in_real_time() -> None:
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=0.2)]})
    engine = ResilientEngine(inner, config())
    loop = asyncio.get_running_loop()

    started = loop.time()
    await engine.complete(ask("hi"))

    assert loop.time() - started >= 0.2


async def test_backoff_is_full_jitter_exponential() -> None:
    sleep = RecordingSleep()
    inner = ScriptedEngine({"hi": [rate_limited(), rate_limited(), rate_limited()]})
    cfg = config(backoff_initial_s=1.0, backoff_max_s=3.0)
    engine = ResilientEngine(inner, cfg, rng=random.Random(7), sleep=sleep)

    await engine.complete(ask("hi"))

    same = random.Random(7)
    expected = [backoff_delay(n, initial_s=1.0, max_s=3.0, rng=same) for n in range(3)]
    assert sleep.delays == expected
    assert [d <= cap for d, cap in zip(sleep.delays, [1.0, 2.0, 3.0], strict=True)] == [True] * 3


async def test_non_retriable_error_is_raised_at_once() -> None:
    sleep = RecordingSleep()
    refused = EngineError("HTTP error 400", retriable=False)
    inner = ScriptedEngine({"hi": [refused]})
    engine = ResilientEngine(inner, config(), sleep=sleep)

    with pytest.raises(EngineError) as caught:
        await engine.complete(ask("hi"))

    assert caught.value is refused
    assert attempts_of(caught.value) == 1
    assert inner.calls == ["hi"]
    assert sleep.delays == []


async def test_gives_up_after_max_retries_with_a_non_retriable_error() -> None:
    sleep = RecordingSleep()
    failures = [EngineError(f"HTTP error 500 #{n}", retriable=True) for n in range(5)]
    inner = ScriptedEngine({"hi": list(failures)})
    engine = ResilientEngine(inner, config(max_retries=2), sleep=sleep)

    with pytest.raises(EngineError) as caught:
        await engine.complete(ask("hi"))

    assert len(inner.calls) == 3
    assert len(sleep.delays) == 2
    assert caught.value.retriable is False
    assert str(caught.value) == "gave up after 3 attempts: HTTP error 500 #2"
    assert caught.value.__cause__ is failures[2]
    assert attempts_of(caught.value) == 3


async def test_zero_max_retries_means_a_single_attempt() -> None:
    inner = ScriptedEngine({"hi": [rate_limited()]})
    engine = ResilientEngine(inner, config(max_retries=0), sleep=RecordingSleep())

    with pytest.raises(EngineError, match="gave up after 1 attempts"):
        await engine.complete(ask("hi"))

    assert inner.calls == ["hi"]


async def test_timeout_becomes_a_retriable_error_and_is_retried() -> None:
    inner = ScriptedEngine({"hi": [HANG]})
    engine = ResilientEngine(inner, config(timeout_s=0.05), sleep=RecordingSleep())

    completion, attempts = await asyncio.wait_for(engine.complete_with_attempts(ask("hi")), 5)

    assert completion.content == "answer to hi"
    assert attempts == 2


async def test_persistent_timeouts_give_up_naming_the_timeout() -> None:
    inner = ScriptedEngine({"hi": [HANG, HANG]})
    engine = ResilientEngine(inner, config(timeout_s=0.05, max_retries=1), sleep=RecordingSleep())

    with pytest.raises(EngineError, match=r"gave up after 2 attempts: .*within 0.05 s"):
        await engine.complete(ask("hi"))


async def test_concurrent_calls_report_their_own_attempts() -> None:
    inner = ScriptedEngine({"slow": [rate_limited(), rate_limited()], "fast": []})
    engine = ResilientEngine(inner, config(), sleep=RecordingSleep())

    slow, fast = await asyncio.gather(
        engine.complete_with_attempts(ask("slow")), engine.complete_with_attempts(ask("fast"))
    )

    assert (slow[1], fast[1]) == (3, 1)
    assert (slow[0].content, fast[0].content) == ("answer to slow", "answer to fast")


async def test_each_attempt_acquires_the_limiter_with_estimated_tokens() -> None:
    limiter = RecordingLimiter()
    inner = ScriptedEngine({"abcdefgh": [rate_limited()]})
    engine = ResilientEngine(inner, config(), limiter=limiter, sleep=RecordingSleep())

    await engine.complete(ask("abcdefgh", max_tokens=100))

    assert limiter.acquired == [102, 102]  # ceil(8 / 4) prompt + 100 completion, per attempt


def test_call_tokens_fall_back_to_config_cap_then_default() -> None:
    request = ask("abcdefghi")  # 3 tokens

    assert estimate_call_tokens(request, config(max_tokens=50)) == 53
    assert estimate_call_tokens(request, config()) == 3 + DEFAULT_COMPLETION_TOKENS


async def test_limiter_budget_is_waited_for_not_failed() -> None:
    limiter = ProviderRateLimiter(1, None, per="second")
    engine = ResilientEngine(ScriptedEngine({}), config(), limiter=limiter)
    loop = asyncio.get_running_loop()

    started = loop.time()
    answers = [await engine.complete(ask(f"q{n}")) for n in range(2)]

    assert [a.content for a in answers] == ["answer to q0", "answer to q1"]
    assert loop.time() - started >= 0.8


async def test_name_is_the_inner_name_and_aclose_closes_the_inner_engine() -> None:
    inner = ScriptedEngine({})
    engine = ResilientEngine(inner, config())

    await engine.aclose()

    assert engine.name == "scripted"
    assert inner.closed is True


def test_attempts_of_a_foreign_error_is_one() -> None:
    assert attempts_of(ValueError("x")) == 1


async def test_a_retry_after_beyond_the_cap_fails_the_engine_at_once() -> None:
    sleep, limiter = RecordingSleep(), RecordingLimiter()
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=86_400.0)]})
    engine = ResilientEngine(inner, config(max_retry_after_s=30.0), limiter=limiter, sleep=sleep)

    with pytest.raises(EngineError) as caught:
        await engine.complete(ask("hi"))

    assert caught.value.retriable is False
    assert "asks to wait 86400 s, more than 30 s" in str(caught.value)
    assert attempts_of(caught.value) == 1
    assert inner.calls == ["hi"]
    assert sleep.delays == []
    assert limiter.penalties == [30.0]  # the shared pause is capped too


async def test_a_retry_after_within_the_cap_is_waited_in_full() -> None:
    sleep = RecordingSleep()
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=30.0)]})
    engine = ResilientEngine(inner, config(max_retry_after_s=30.0), sleep=sleep)

    _, attempts = await engine.complete_with_attempts(ask("hi"))

    assert (attempts, sleep.delays) == (2, [30.0])


async def test_no_retry_is_started_that_would_end_past_the_turns_budget() -> None:
    sleep = RecordingSleep()
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=2.0), rate_limited()]})
    engine = ResilientEngine(inner, config(), sleep=sleep)

    with pytest.raises(EngineError, match=r"gave up after 1 attempts: .*deadline") as caught:
        await engine.complete_with_attempts(ask("hi"), budget_s=1.0)

    assert inner.calls == ["hi"]
    assert sleep.delays == []
    assert caught.value.retriable is False


async def test_retries_within_the_budget_go_on() -> None:
    sleep = RecordingSleep()
    inner = ScriptedEngine({"hi": [rate_limited(retry_after=0.5)]})
    engine = ResilientEngine(inner, config(), sleep=sleep)

    _, attempts = await engine.complete_with_attempts(ask("hi"), budget_s=5.0)

    assert (attempts, sleep.delays) == (2, [0.5])


async def test_a_429_without_retry_after_pauses_the_shared_limiter_for_the_backoff() -> None:
    sleep, limiter = RecordingSleep(), RecordingLimiter()
    no_header = EngineError("rate limited 429", retriable=True, rate_limited=True)
    server_error = EngineError("HTTP error 500", retriable=True)
    inner = ScriptedEngine({"hi": [no_header, server_error]})
    engine = ResilientEngine(inner, config(), limiter=limiter, sleep=sleep)

    await engine.complete(ask("hi"))

    assert len(sleep.delays) == 2
    assert limiter.penalties == [sleep.delays[0]]  # the 429 paused everyone; the 500 did not


class UsageEngine(ScriptedEngine):
    """Answers reporting 500 prompt and 20 completion tokens."""

    async def complete(self, request: CompletionRequest) -> Completion:
        answer = await super().complete(request)
        return Completion(
            content=answer.content, model="m", prompt_tokens=500, completion_tokens=20
        )


async def test_the_tokens_the_provider_reported_are_settled_with_the_limiter() -> None:
    limiter = RecordingLimiter()
    engine = ResilientEngine(UsageEngine({}), config(), limiter=limiter)

    await engine.complete(ask("abcdefgh", max_tokens=100))

    assert limiter.acquired == [102]
    assert limiter.settled == [(102, 520)]


# --- each call reported to on_call ------------------------------------------------------------


class SlowEngine(ScriptedEngine):
    """Takes ``delay_s`` per call before playing its script."""

    def __init__(self, scripts: dict[str, list[Outcome]], delay_s: float) -> None:
        super().__init__(scripts)
        self.delay_s = delay_s

    async def complete(self, request: CompletionRequest) -> Completion:
        await asyncio.sleep(self.delay_s)
        return await super().complete(request)


async def test_each_call_is_timed_without_the_backoff_between_calls() -> None:
    calls: list[CallRecord] = []
    inner = SlowEngine({"hi": [rate_limited(retry_after=0.3)]}, delay_s=0.05)
    engine = ResilientEngine(inner, config())

    await engine.complete_with_attempts(ask("hi"), on_call=calls.append)

    assert [type(c.error) for c in calls] == [EngineError, type(None)]
    assert all(0.05 <= c.duration_s < 0.3 for c in calls), calls


async def test_the_wait_for_the_rate_limiter_is_not_part_of_a_calls_duration() -> None:
    calls: list[CallRecord] = []
    limiter = ProviderRateLimiter(1, None, per="second")
    engine = ResilientEngine(ScriptedEngine({}), config(), limiter=limiter)
    loop = asyncio.get_running_loop()

    started = loop.time()
    for n in range(2):
        await engine.complete_with_attempts(ask(f"q{n}"), on_call=calls.append)

    assert loop.time() - started >= 0.8  # the second call waited for the limiter
    assert len(calls) == 2
    assert all(c.duration_s < 0.2 for c in calls), calls


async def test_a_timed_out_call_is_reported_with_its_duration() -> None:
    calls: list[CallRecord] = []
    inner = ScriptedEngine({"hi": [HANG]})
    engine = ResilientEngine(inner, config(timeout_s=0.1), sleep=RecordingSleep())

    await engine.complete_with_attempts(ask("hi"), on_call=calls.append)

    timed_out, answered = calls
    assert isinstance(timed_out.error, EngineError)
    assert "within 0.1 s" in str(timed_out.error)
    assert 0.1 <= timed_out.duration_s < 1.0
    assert timed_out.usage is None
    assert answered.error is None


class BilledBlank(ScriptedEngine):
    """Rejects its first answer as blank, billed 40 + 7 tokens, then answers (30 + 5)."""

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls.append(request.messages[-1].content)
        if len(self.calls) == 1:
            raise RejectedCompletion("blank reply", retriable=True, usage=Usage("m-blank", 40, 7))
        return Completion(content="ok", model="m", prompt_tokens=30, completion_tokens=5)


async def test_a_rejected_completion_reports_and_settles_the_tokens_it_was_billed() -> None:
    calls: list[CallRecord] = []
    limiter = RecordingLimiter()
    engine = ResilientEngine(BilledBlank({}), config(), limiter=limiter, sleep=RecordingSleep())

    completion, attempts = await engine.complete_with_attempts(
        ask("abcdefgh", max_tokens=10), on_call=calls.append
    )

    assert (completion.content, attempts) == ("ok", 2)
    assert [c.usage for c in calls] == [Usage("m-blank", 40, 7), Usage("m", 30, 5)]
    assert isinstance(calls[0].error, RejectedCompletion)
    assert limiter.settled == [(12, 47), (12, 35)]


async def test_an_unexpected_exception_is_reported_as_a_call_and_raised() -> None:
    calls: list[CallRecord] = []

    class Broken(ScriptedEngine):
        async def complete(self, request: CompletionRequest) -> Completion:
            raise RuntimeError("TLS stream ended")

    engine = ResilientEngine(Broken({}), config())

    with pytest.raises(RuntimeError):
        await engine.complete_with_attempts(ask("hi"), on_call=calls.append)

    (call,) = calls
    assert isinstance(call.error, RuntimeError)
    assert call.usage is None


async def test_no_call_is_reported_when_the_budget_is_spent_before_the_first() -> None:
    calls: list[CallRecord] = []
    engine = ResilientEngine(ScriptedEngine({}), config())

    with pytest.raises(EngineError):
        await engine.complete_with_attempts(ask("hi"), budget_s=0.0, on_call=calls.append)

    assert calls == []


async def test_a_spent_budget_raises_before_waiting_for_the_rate_limiter() -> None:
    # Before, the attempt first waited for the limiter (here: 1 call per minute, already
    # taken), and only then noticed that the deadline had passed.
    limiter = RecordingLimiter()
    engine = ResilientEngine(ScriptedEngine({}), config(), limiter=limiter)

    with pytest.raises(EngineError, match=r"gave up after 0 attempts: .*deadline") as caught:
        await asyncio.wait_for(engine.complete_with_attempts(ask("hi"), budget_s=-1.0), 1.0)

    assert caught.value.deadline_passed
    assert caught.value.retriable is False
    assert attempts_of(caught.value) == 0
    assert limiter.acquired == []


async def test_a_spent_budget_does_not_wait_for_a_busy_limiter() -> None:
    limiter = ProviderRateLimiter(1, None, per="minute")
    engine = ResilientEngine(ScriptedEngine({}), config(), limiter=limiter)
    await engine.complete(ask("first"))  # takes the minute's only call

    with pytest.raises(EngineError, match="deadline") as caught:
        await asyncio.wait_for(engine.complete_with_attempts(ask("hi"), budget_s=0.0), 1.0)

    assert caught.value.deadline_passed


async def test_an_on_call_that_raises_does_not_throw_away_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, the callback's exception replaced the completion: the caller saw a failure for
    # an answer the provider had billed.
    def broken(call: CallRecord) -> None:
        raise ValueError("metrics broke")

    engine = ResilientEngine(ScriptedEngine({}), config())

    completion, attempts = await engine.complete_with_attempts(ask("hi"), on_call=broken)

    assert (completion.content, attempts) == ("answer to hi", 1)
    assert "on_call raised" in caplog.text
    assert "metrics broke" in caplog.text


async def test_an_on_call_that_raises_does_not_replace_a_retriable_error() -> None:
    reported: list[CallRecord] = []

    def broken(call: CallRecord) -> None:
        reported.append(call)
        raise ValueError("metrics broke")

    inner = ScriptedEngine({"hi": [rate_limited()]})
    engine = ResilientEngine(inner, config(), sleep=RecordingSleep())

    completion, attempts = await engine.complete_with_attempts(ask("hi"), on_call=broken)

    assert (completion.content, attempts) == ("answer to hi", 2)  # the 429 was retried
    assert [type(c.error) for c in reported] == [EngineError, type(None)]
