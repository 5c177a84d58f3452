"""The real AsyncOpenAI client, through OpenAIEngine and ResilientEngine, against a fake server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from support.fake_openai import FakeOpenAI

from connectors.errors import EngineError
from connectors.llm.base import (
    CallRecord,
    CompletionRequest,
    ContextLengthExceeded,
    LLMEngine,
    RejectedCompletion,
    Usage,
)
from connectors.llm.openai_engine import OpenAIEngine, build_openai_engine, parse_retry_after
from connectors.llm.ratelimit import ProviderRateLimiter
from connectors.llm.resilient import ResilientEngine, attempts_of
from processors.config import EngineConfig, PersonaConfig
from schemas.models import ChatMessage, Role

pytestmark = pytest.mark.integration

PERSONA = PersonaConfig(name="Ada")


def config(**overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "kind": "openai",
        "model": "gpt-test",
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    }
    values.update(overrides)
    return EngineConfig.model_validate(values)


def ask(*turns: tuple[Role, str], **options: Any) -> CompletionRequest:
    return CompletionRequest(
        persona_id="ada",
        persona=PERSONA,
        messages=[ChatMessage(role=role, content=content) for role, content in turns],
        **options,
    )


HELLO = ask((Role.SYSTEM, "You are Ada."), (Role.USER, "hello there"))


async def failure_of(engine: LLMEngine) -> EngineError:
    """The EngineError ``engine`` raises for HELLO (the test fails if it answers); closes it."""
    try:
        with pytest.raises(EngineError) as caught:
            await engine.complete(HELLO)
    finally:
        await engine.aclose()
    return caught.value


@asynccontextmanager
async def resilient(
    server: FakeOpenAI, cfg: EngineConfig, limiter: ProviderRateLimiter | None = None
) -> AsyncIterator[ResilientEngine]:
    inner = OpenAIEngine(cfg, api_key=server.api_key, base_url=server.base_url)
    engine = ResilientEngine(inner, cfg, limiter=limiter)
    try:
        yield engine
    finally:
        await engine.aclose()


async def test_completion_carries_reply_model_and_reported_usage() -> None:
    async with FakeOpenAI() as server, resilient(server, config()) as engine:
        completion, attempts = await engine.complete_with_attempts(HELLO)

    assert completion.content == "echo: hello there"
    assert completion.model == "gpt-test"
    assert completion.finish_reason == "stop"
    # The fake counts ceil(chars / 4): "You are Ada." 3 + "hello there" 3; "echo: hello there" 5.
    assert (completion.prompt_tokens, completion.completion_tokens) == (6, 5)
    assert attempts == 1
    assert len(server.requests) == 1


async def test_request_sends_bearer_key_model_messages_and_sampling_options() -> None:
    cfg = config(temperature=0.3, max_tokens=64)
    async with FakeOpenAI(api_key="sk-secret") as server, resilient(server, cfg) as engine:
        await engine.complete(HELLO)
        await engine.complete(ask((Role.USER, "hi"), model="gpt-other", temperature=1.5))

    first, second = server.requests
    assert first.headers["authorization"] == "Bearer sk-secret"
    assert first.body["model"] == "gpt-test"
    assert first.body["messages"] == [
        {"role": "system", "content": "You are Ada."},
        {"role": "user", "content": "hello there"},
    ]
    assert (first.body["temperature"], first.body["max_tokens"]) == (0.3, 64)
    assert second.body["model"] == "gpt-other"
    assert second.body["temperature"] == 1.5


async def test_unset_sampling_options_are_not_sent() -> None:
    async with FakeOpenAI() as server, resilient(server, config()) as engine:
        await engine.complete(HELLO)

    assert "temperature" not in server.requests[0].body
    assert "max_tokens" not in server.requests[0].body


async def test_missing_usage_is_estimated_from_characters() -> None:
    async with (
        FakeOpenAI(include_usage=False) as server,
        resilient(server, config()) as engine,
    ):
        completion = await engine.complete(ask((Role.USER, "abcdefghi")))

    assert completion.content == "echo: abcdefghi"
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 4)


async def test_negative_usage_counts_as_zero_and_keeps_the_answer() -> None:
    async with (
        FakeOpenAI(faults=["negative_usage"]) as server,
        resilient(server, config()) as engine,
    ):
        completion, attempts = await engine.complete_with_attempts(ask((Role.USER, "hi")))

    assert (completion.content, attempts) == ("echo: hi", 1)
    assert (completion.prompt_tokens, completion.completion_tokens) == (0, 0)


async def test_rate_limited_call_waits_retry_after_then_succeeds() -> None:
    async with (
        FakeOpenAI(faults=["429:0.3"]) as server,
        resilient(server, config(), ProviderRateLimiter(None, None)) as engine,
    ):
        completion, attempts = await engine.complete_with_attempts(HELLO)

    assert completion.content == "echo: hello there"
    assert attempts == 2
    first, second = server.requests
    assert first.fault == "429:0.3"
    assert second.received_at - first.received_at >= 0.3


class SignallingLimiter(ProviderRateLimiter):
    """A limiter that also signals when a call penalized it."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self.penalized = asyncio.Event()

    def penalize(self, retry_after_s: float) -> None:
        super().penalize(retry_after_s)
        self.penalized.set()


async def test_rate_limit_pauses_other_calls_sharing_the_limiter() -> None:
    limiter = SignallingLimiter()
    async with (
        FakeOpenAI(faults=["429:0.4"]) as server,
        resilient(server, config(), limiter) as engine,
    ):
        limited = asyncio.create_task(engine.complete(ask((Role.USER, "first"))))
        await asyncio.wait_for(limiter.penalized.wait(), timeout=5)
        other = await engine.complete(ask((Role.USER, "second")))
        await limited

    assert other.content == "echo: second"
    first_429 = server.requests[0]
    later = [r for r in server.requests if r.body["messages"][0]["content"] == "second"]
    assert later[0].received_at - first_429.received_at >= 0.4


@pytest.mark.parametrize(
    "fault", ["500", "503", "timeout", "malformed", "html", "empty_choices", "blank_reply"]
)
async def test_transient_fault_is_retried_then_succeeds(fault: str) -> None:
    cfg = config(timeout_s=0.3)
    async with (
        FakeOpenAI(faults=[fault], hang_s=5.0) as server,
        resilient(server, cfg) as engine,
    ):
        completion, attempts = await engine.complete_with_attempts(HELLO)

    assert completion.content == "echo: hello there"
    assert attempts == 2
    assert [r.fault for r in server.requests] == [fault, None]


@pytest.mark.parametrize(
    ("fault", "retriable", "retry_after", "fragment"),
    [
        ("429:0.25", True, 0.25, "rate limited 429"),
        ("429", True, None, "rate limited 429"),
        ("500", True, None, "500"),
        ("400", False, None, "400"),
        ("404", False, None, "404"),
        ("422", False, None, "422"),
        ("malformed", True, None, "malformed body"),
        ("html", True, None, "malformed body"),
        ("empty_choices", True, None, "empty choices"),
        ("blank_reply", True, None, "blank reply"),
        ("blank_length", False, None, "blank reply, max_tokens reached"),
        ("quota", False, None, "out of quota"),
        ("content_filter", False, None, "content filter"),
    ],
)
async def test_openai_engine_maps_fault_to_engine_error(
    fault: str, retriable: bool, retry_after: float | None, fragment: str
) -> None:
    async with FakeOpenAI(faults=[fault], retry_after=None) as server:
        engine = OpenAIEngine(config(), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert error.retriable is retriable
    assert error.retry_after == retry_after
    assert error.rate_limited is fault.startswith("429")  # not "quota": that 429 is billing
    assert fragment in str(error)


async def test_retry_after_ms_header_wins_over_retry_after() -> None:
    async with FakeOpenAI(faults=["429"], retry_after="7", retry_after_ms="150") as server:
        engine = OpenAIEngine(config(), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert error.retry_after == pytest.approx(0.15)


@pytest.mark.parametrize(
    "fault", ["400", "quota", "content_filter", "blank_length", "context_length_exceeded"]
)
async def test_a_request_that_cannot_succeed_is_not_retried(fault: str) -> None:
    async with (
        FakeOpenAI(faults=[fault]) as server,
        resilient(server, config()) as engine,
    ):
        with pytest.raises(EngineError) as caught:
            await engine.complete(HELLO)

    assert caught.value.retriable is False
    assert attempts_of(caught.value) == 1
    assert [r.fault for r in server.requests] == [fault]


async def test_wrong_api_key_is_not_retried() -> None:
    async with FakeOpenAI(api_key="right") as server:
        cfg = config()
        engine = ResilientEngine(OpenAIEngine(cfg, api_key="wrong", base_url=server.base_url), cfg)
        error = await failure_of(engine)

    assert error.retriable is False
    assert "401" in str(error)
    assert len(server.requests) == 1


async def test_persistent_server_errors_give_up_after_max_retries_plus_one_requests() -> None:
    async with (
        FakeOpenAI(faults=["500"] * 5) as server,
        resilient(server, config(max_retries=2)) as engine,
    ):
        with pytest.raises(EngineError) as caught:
            await engine.complete(HELLO)

    assert len(server.requests) == 3
    assert len(server.faults) == 2
    assert caught.value.retriable is False
    assert str(caught.value).startswith("gave up after 3 attempts: ")
    assert "500" in str(caught.value)
    assert attempts_of(caught.value) == 3


async def test_unreachable_endpoint_is_a_retriable_connection_error() -> None:
    async with FakeOpenAI() as server:
        base_url = server.base_url
    engine = OpenAIEngine(config(), api_key="k", base_url=base_url)
    error = await failure_of(engine)

    assert error.retriable is True
    assert "connection" in str(error)


async def test_empty_model_is_a_non_retriable_error_without_a_request() -> None:
    async with FakeOpenAI() as server:
        engine = OpenAIEngine(config(model=""), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert error.retriable is False
    assert server.requests == []


async def test_build_openai_engine_reads_key_and_base_url_from_the_environment() -> None:
    async with FakeOpenAI(api_key="from-env") as server:
        env = {"SB_LLM_KEY": "from-env", "OPENAI_BASE_URL": server.base_url}
        engine: LLMEngine = build_openai_engine(config(api_key_env="SB_LLM_KEY"), env)
        try:
            completion = await engine.complete(HELLO)
        finally:
            await engine.aclose()

    assert engine.name == "openai"
    assert completion.content == "echo: hello there"
    assert server.requests[0].headers["authorization"] == "Bearer from-env"


def test_build_openai_engine_without_key_names_the_variable() -> None:
    with pytest.raises(ValueError, match="SB_LLM_KEY"):
        build_openai_engine(config(api_key_env="SB_LLM_KEY"), {"OPENAI_API_KEY": "other"})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.2"}, 0.2),
        ({"Retry-After": "3", "retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "-4"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after_reads_delay_seconds(
    headers: dict[str, str], expected: float | None
) -> None:
    assert parse_retry_after(headers) == (None if expected is None else pytest.approx(expected))


def test_parse_retry_after_reads_http_dates_against_the_clock() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=42), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=42), usegmt=True)

    assert later.endswith("GMT")
    assert parse_retry_after({"Retry-After": later}, now=now.timestamp) == pytest.approx(42.0)
    assert parse_retry_after({"Retry-After": earlier}, now=now.timestamp) == 0.0


def test_fake_server_rejects_unknown_faults() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FakeOpenAI(faults=["explode"])


async def test_fake_server_rejects_a_request_breaking_the_contract() -> None:
    async with FakeOpenAI() as server, httpx.AsyncClient() as client:
        no_key = await client.post(f"{server.base_url}/chat/completions", json={})
        headers = {"Authorization": f"Bearer {server.api_key}"}
        no_messages = await client.post(
            f"{server.base_url}/chat/completions", json={"model": "m"}, headers=headers
        )

    assert no_key.status_code == 401
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    assert len(server.requests) == 2


# --- context_length_exceeded and billed rejections ---------------------------------------------


async def test_context_length_exceeded_is_its_own_non_retriable_error() -> None:
    async with FakeOpenAI(faults=["context_length_exceeded"]) as server:
        engine = OpenAIEngine(config(), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert isinstance(error, ContextLengthExceeded)
    assert error.retriable is False
    assert "maximum context length is 8192 tokens" in str(error)


async def test_the_fake_refuses_a_prompt_over_its_context_with_openais_error_body() -> None:
    long_prompt = ask((Role.SYSTEM, "You are Ada."), (Role.USER, "x" * 400))  # 3 + 100 tokens
    async with (
        FakeOpenAI(context_tokens=100) as server,
        resilient(server, config()) as engine,
        httpx.AsyncClient() as client,
    ):
        with pytest.raises(ContextLengthExceeded) as caught:
            await engine.complete(long_prompt)
        answered = await engine.complete(HELLO)  # 6 tokens: within the context
        raw = await client.post(
            f"{server.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "y" * 404}]},
            headers={"Authorization": f"Bearer {server.api_key}"},
        )

    assert attempts_of(caught.value) == 1  # not retried: the same prompt fails again
    assert answered.content == "echo: hello there"
    assert raw.status_code == 400
    assert raw.json() == {
        "error": {
            "message": "This model's maximum context length is 100 tokens. However, your "
            "messages resulted in 101 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


@asynccontextmanager
async def answering_400(body: dict[str, Any]) -> AsyncIterator[str]:
    """A loopback endpoint answering every chat completion with HTTP 400 and ``body``; yields
    its base URL."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("error", "overflow"),
    [
        # DeepSeek's OpenAI-compatible API: OpenAI's message, another code
        (
            {
                "message": "This model's maximum context length is 131072 tokens. However, you "
                "requested 131134 tokens (122942 in the messages, 8192 in the completion). "
                "Please reduce the length of the messages or completion.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            },
            True,
        ),
        (
            {"message": "Invalid 'temperature'.", "type": "invalid_request_error", "code": None},
            False,
        ),
    ],
)
async def test_a_400_is_a_context_overflow_by_its_code_or_openais_message(
    error: dict[str, Any], overflow: bool
) -> None:
    async with answering_400({"error": error}) as base_url:
        engine = OpenAIEngine(config(), api_key="k", base_url=base_url)
        mapped = await failure_of(engine)

    assert isinstance(mapped, ContextLengthExceeded) is overflow
    assert mapped.retriable is False


async def test_vllms_context_error_for_a_long_prompt_is_a_context_overflow() -> None:
    # vLLM's body: the error object at the top level, "code": 400, no context_length_exceeded.
    long_prompt = ask((Role.SYSTEM, "You are Ada."), (Role.USER, "x" * 400), max_tokens=10)
    async with (
        FakeOpenAI(context_tokens=100, context_error="vllm") as server,
        resilient(server, config()) as engine,
    ):
        with pytest.raises(ContextLengthExceeded) as caught:
            await engine.complete(long_prompt)

    assert "(103 in the messages, 10 in the completion)" in str(caught.value)
    assert attempts_of(caught.value) == 1


async def test_vllms_context_error_for_max_tokens_alone_is_not_a_prompt_overflow() -> None:
    # The message carries OpenAI's phrase "maximum context length", but the completion cap
    # alone (200) exceeds the context (100): no shorter prompt can pass. Before, matching the
    # phrase made it a ContextLengthExceeded, and the stage retried with less history.
    async with (
        FakeOpenAI(context_tokens=100, context_error="vllm") as server,
        resilient(server, config()) as engine,
    ):
        with pytest.raises(EngineError) as caught:
            await engine.complete(ask((Role.USER, "hello"), max_tokens=200))

    assert not isinstance(caught.value, ContextLengthExceeded)
    assert caught.value.retriable is False
    assert "200 in the completion" in str(caught.value)
    assert [r.fault for r in server.requests] == [None]  # not retried


async def test_openais_context_error_body_is_read_from_its_error_object() -> None:
    async with (
        FakeOpenAI(context_tokens=100) as server,
        resilient(server, config()) as engine,
    ):
        with pytest.raises(ContextLengthExceeded):
            await engine.complete(ask((Role.USER, "x" * 400), max_tokens=10))


@pytest.mark.parametrize(
    ("body", "overflow"),
    [
        # vLLM's newer wording when the prompt fits but prompt + max_tokens does not: a
        # shorter prompt can pass
        (
            {
                "object": "error",
                "message": "'max_tokens' or 'max_completion_tokens' is too large: 1000. This "
                "model's maximum context length is 4096 tokens and your request has 3500 "
                "input tokens (1000 > 4096 - 3500).",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            True,
        ),
        # the same when max_tokens alone is over the context: it cannot
        (
            {
                "object": "error",
                "message": "'max_tokens' or 'max_completion_tokens' is too large: 5000. This "
                "model's maximum context length is 4096 tokens and your request has 12 input "
                "tokens (5000 > 4096 - 12).",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            False,
        ),
        # the code alone says it, whatever the message
        (
            {"error": {"message": "Too long.", "type": None, "code": "context_length_exceeded"}},
            True,
        ),
        # the phrase outside the error's own message does not count
        (
            {
                "error": {
                    "message": "Invalid value for 'temperature'.",
                    "type": "invalid_request_error",
                    "param": "maximum context length",
                    "code": None,
                }
            },
            False,
        ),
    ],
)
async def test_a_context_overflow_is_read_from_the_error_objects_code_and_message(
    body: dict[str, Any], overflow: bool
) -> None:
    async with answering_400(body) as base_url:
        engine = OpenAIEngine(config(), api_key="k", base_url=base_url)
        mapped = await failure_of(engine)

    assert isinstance(mapped, ContextLengthExceeded) is overflow
    assert mapped.retriable is False


@pytest.mark.parametrize(
    ("fault", "retriable"),
    [
        ("blank_reply", True),
        ("blank_length", False),
        ("content_filter", False),
        ("empty_choices", True),
    ],
)
async def test_a_rejected_answer_carries_the_usage_it_reported(fault: str, retriable: bool) -> None:
    async with FakeOpenAI(faults=[fault]) as server:
        engine = OpenAIEngine(config(), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert isinstance(error, RejectedCompletion)
    assert error.retriable is retriable
    # The fake counts ceil(chars / 4): prompt 3 + 3, the reply it generated "echo: hello there" 5
    assert error.usage == Usage("gpt-test", 6, 5)


async def test_a_rejected_answer_without_usage_is_a_plain_engine_error() -> None:
    async with FakeOpenAI(faults=["blank_length"], include_usage=False) as server:
        engine = OpenAIEngine(config(), api_key=server.api_key, base_url=server.base_url)
        error = await failure_of(engine)

    assert not isinstance(error, RejectedCompletion)
    assert "blank reply" in str(error)


async def test_every_call_with_usage_is_reported_through_the_real_client() -> None:
    calls: list[CallRecord] = []
    async with (
        FakeOpenAI(faults=["blank_reply", "500"]) as server,
        resilient(server, config()) as engine,
    ):
        completion, attempts = await engine.complete_with_attempts(HELLO, on_call=calls.append)

    assert (completion.content, attempts) == ("echo: hello there", 3)
    assert [c.usage for c in calls] == [Usage("gpt-test", 6, 5), None, Usage("gpt-test", 6, 5)]
    assert [type(c.error).__name__ for c in calls] == [
        "RejectedCompletion",
        "EngineError",
        "NoneType",
    ]
