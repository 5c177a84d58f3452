"""An OpenAI-compatible Chat Completions server on loopback, with scripted faults, for tests.

The server speaks the request and response shapes of the OpenAI API reference, *Chat > Create
chat completion* (``POST /v1/chat/completions``), so the real ``openai`` client can be pointed at
it with ``base_url=server.base_url``. It answers deterministically (``"echo: <last user
content>"`` unless a ``reply`` function is given), counts tokens as ``ceil(chars / 4)``, and
records every request it receives.

Faults are scripted per server in ``server.faults`` (a mutable deque; one fault is consumed per
valid request, oldest first; an empty deque means "answer normally"):

- ``"429"``: 429 ``rate_limit_exceeded`` with ``Retry-After: <retry_after>`` (and
  ``retry-after-ms`` when ``retry_after_ms`` is set); ``"429:V"`` sends the header value ``V``
  (``"429:0.2"``, or an HTTP-date).
- ``"500"``, ``"400"`` or any other 4xx/5xx status ``"NNN"``: that status with an OpenAI-style
  error body (``{"error": {"message", "type", "param", "code"}}``).
- ``"timeout"``: no answer for ``hang_s`` seconds (longer than any client timeout in tests).
- ``"malformed"``: 200 ``application/json`` whose body is not valid JSON (a flaky proxy).
- ``"html"``: 200 ``text/html`` (a proxy's error page instead of JSON).
- ``"empty_choices"``: 200, a valid completion with ``choices: []``.
- ``"quota"``: 429 with code ``insufficient_quota``, what OpenAI answers when the account's
  credit is used up (OpenAI *Error codes*: "You exceeded your current quota").
- ``"content_filter"``: 200 whose choice has ``content: null`` and ``finish_reason:
  "content_filter"`` (the reply was withheld by the provider's filter).
- ``"negative_usage"``: 200, a normal reply whose ``usage`` counts are negative (a proxy's bug).
- ``"blank_reply"``: 200 whose choice's ``content`` is ``""`` (``finish_reason: "stop"``).
- ``"blank_length"``: 200 whose choice's ``content`` is ``""`` with ``finish_reason:
  "length"`` (a reasoning model that spent ``max_tokens`` before writing anything).
- ``"context_length_exceeded"``: 400 with the body api.openai.com sends for a prompt longer
  than the model's context: ``{"error": {"message": "This model's maximum context length is
  N tokens. However, your messages resulted in M tokens. Please reduce the length of the
  messages.", "type": "invalid_request_error", "param": "messages", "code":
  "context_length_exceeded"}}``.

Independently of the script, ``context_tokens`` gives the server a context window: a request
whose prompt tokens plus ``max_tokens`` exceed it gets that same 400, as the real API refuses
it; or, with ``context_error="vllm"``, the 400 vLLM's OpenAI-compatible server sends (its
error object at the top level, ``code`` the HTTP status, the message naming the completion's
share)::

    {"object": "error", "message": "This model's maximum context length is N tokens. However,
    you requested T tokens (P in the messages, C in the completion). Please reduce the length
    of the messages or completion.", "type": "BadRequestError", "param": null, "code": 400}

Faults given to the constructor are checked; one appended later and unknown is answered with a
500 naming it.

Example::

    async with FakeOpenAI(faults=["429", "500"], retry_after="0.2") as server:
        client = openai.AsyncOpenAI(api_key=server.api_key, base_url=server.base_url)
        ...
        assert len(server.requests) == 3
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "NAMED_FAULTS",
    "FakeOpenAI",
    "RecordedRequest",
]

logger = logging.getLogger(__name__)

NAMED_FAULTS = frozenset(
    {
        "429",
        "500",
        "400",
        "timeout",
        "malformed",
        "html",
        "empty_choices",
        "quota",
        "content_filter",
        "negative_usage",
        "blank_reply",
        "blank_length",
        "context_length_exceeded",
    }
)
"""Faults with a name; any other three-digit 4xx/5xx status and ``"429:<value>"`` work too."""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MALFORMED_BODY = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": ['


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the server received.

    Attributes:
        body: The JSON-decoded body, or None when it was not valid JSON.
        headers: Request headers, names lower-cased.
        fault: The fault applied to it, or None (answered normally, or rejected as invalid).
        received_at: ``time.monotonic()`` when it arrived (s).
    """

    body: Any
    headers: dict[str, str]
    fault: str | None
    received_at: float


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(_tokens(m["content"]) for m in messages if isinstance(m["content"], str))


def _context_length_exceeded(context_tokens: int, requested: int) -> web.Response:
    """The 400 OpenAI answers for a prompt longer than the model's context."""
    return _error(
        400,
        f"This model's maximum context length is {context_tokens} tokens. However, your "
        f"messages resulted in {requested} tokens. Please reduce the length of the messages.",
        code="context_length_exceeded",
        param="messages",
    )


def _vllm_context_error(context_tokens: int, prompt_tokens: int, max_tokens: int) -> web.Response:
    """The 400 vLLM answers for a prompt plus ``max_tokens`` longer than the model's context
    (vLLM's ``OpenAIServing._validate_input``, its ``ErrorResponse`` shape)."""
    message = (
        f"This model's maximum context length is {context_tokens} tokens. However, you "
        f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or "
        "completion."
    )
    body = {
        "object": "error",
        "message": message,
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    return web.json_response(body, status=400)


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _contract_problem(body: Any) -> tuple[str, str | None] | None:
    """``(message, param)`` of the first way ``body`` breaks the request contract, or None."""
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request.", None
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "You must provide a model parameter.", "model"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array.", "messages"
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in _ROLES
            or not isinstance(message.get("content"), str | list)
        ):
            return f"Invalid 'messages[{index}]': needs a valid 'role' and a 'content'.", (
                f"messages[{index}]"
            )
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return "'max_tokens' must be an integer >= 1.", "max_tokens"
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        return "'temperature' must be a number between 0 and 2.", "temperature"
    return None


def _is_status_fault(fault: str) -> bool:
    return len(fault) == 3 and fault.isdigit() and 400 <= int(fault) <= 599


def _check_fault(fault: str) -> None:
    if fault in NAMED_FAULTS or fault.startswith("429:") or _is_status_fault(fault):
        return
    raise ValueError(
        f"unknown fault {fault!r}; expected one of {sorted(NAMED_FAULTS)}, a 4xx/5xx "
        "status or '429:<Retry-After value>'"
    )


def _default_reply(messages: list[dict[str, Any]]) -> str:
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last_user.get("content") if last_user is not None else ""
    return f"echo: {content if isinstance(content, str) else ''}"


class FakeOpenAI:
    """The server: ``async with FakeOpenAI(...) as server``, or ``await start()`` / ``aclose()``.

    Args:
        api_key: The key clients must send as ``Authorization: Bearer <key>`` (401 otherwise);
            None accepts any or no key.
        latency_s: Seconds to wait before answering each valid request.
        faults: Initial fault script (see the module docstring).
        retry_after: ``Retry-After`` header value of ``"429"`` faults; None sends none.
        retry_after_ms: ``retry-after-ms`` header value of ``"429"`` faults (OpenAI's
            non-standard header); None sends none.
        hang_s: How long a ``"timeout"`` fault withholds the answer (s); closing the server
            ends the wait early.
        reply: Computes the reply text from the request's ``messages``; default
            ``"echo: <last user content>"``.
        include_usage: Whether completions carry ``usage``.
        context_tokens: The model's context window (prompt tokens, counted as ``ceil(chars /
            4)`` per message, plus ``max_tokens``); a request over it gets the 400
            ``context_length_exceeded``. None: no limit.
        context_error: The body of that 400: ``"openai"`` (api.openai.com's) or ``"vllm"``
            (see the module docstring).
        reported_model: The ``model`` completions report; None: the model asked for. Real
            servers report a snapshot (``gpt-4o-2024-08-06`` for ``gpt-4o``), a gateway's
            routing (``openai/gpt-4o``) or vLLM's served path.

    Raises:
        ValueError: An unknown fault, or a negative ``latency_s`` / ``hang_s``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        latency_s: float = 0.0,
        faults: Iterable[str] = (),
        retry_after: str | None = "1",
        retry_after_ms: str | None = None,
        hang_s: float = 30.0,
        reply: Callable[[list[dict[str, Any]]], str] | None = None,
        include_usage: bool = True,
        context_tokens: int | None = None,
        context_error: Literal["openai", "vllm"] = "openai",
        reported_model: str | None = None,
    ) -> None:
        if hang_s < 0:
            raise ValueError(f"hang_s must be >= 0, got {hang_s}")
        self.api_key = api_key
        self.faults: deque[str] = deque()
        for fault in faults:
            _check_fault(fault)
            self.faults.append(fault)
        self.requests: list[RecordedRequest] = []
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.hang_s = hang_s
        self.include_usage = include_usage
        self.context_tokens = context_tokens
        self.context_error = context_error
        self.reported_model = reported_model
        self._reply = reply or _default_reply
        self._latency_s = 0.0
        self.set_latency(latency_s)
        self._served = 0
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the ``base_url`` for ``openai.AsyncOpenAI``.

        Raises:
            RuntimeError: The server is not started.
        """
        if self._port is None:
            raise RuntimeError("the fake OpenAI server is not started")
        return f"http://127.0.0.1:{self._port}/v1"

    def set_latency(self, latency_s: float) -> None:
        """Wait ``latency_s`` seconds before answering each later request.

        Raises:
            ValueError: ``latency_s`` is negative.
        """
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self._latency_s = latency_s

    async def start(self) -> FakeOpenAI:
        """Listen on a free port of 127.0.0.1 and return self."""
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.debug("fake OpenAI server listening on %s", self.base_url)
        return self

    async def aclose(self) -> None:
        """Stop listening; hanging ``"timeout"`` faults end at once."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def completion_body(self, body: Mapping[str, Any], *, empty: bool = False) -> dict[str, Any]:
        """The ``chat.completion`` object answering a valid request ``body``.

        ``max_tokens`` truncates the reply to ``4 * max_tokens`` characters with
        ``finish_reason="length"``, as the real API stops at the cap.
        """
        reply = self._reply(list(body["messages"]))
        finish_reason = "stop"
        completion_tokens = _tokens(reply)
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and completion_tokens > max_tokens:
            reply, completion_tokens, finish_reason = reply[: 4 * max_tokens], max_tokens, "length"
        prompt_tokens = _prompt_tokens(body["messages"])
        self._served += 1
        result: dict[str, Any] = {
            "id": f"chatcmpl-fake-{self._served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.reported_model or body["model"],
            "choices": []
            if empty
            else [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "system_fingerprint": None,
        }
        if self.include_usage:
            result["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return result

    async def _chat_completions(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        invalid: web.Response | None = None
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            invalid = _error(401, "Incorrect API key provided.", code="invalid_api_key")
        elif (problem := _contract_problem(body)) is not None:
            invalid = _error(400, problem[0], param=problem[1])
        fault = self.faults.popleft() if invalid is None and self.faults else None
        self.requests.append(RecordedRequest(body, headers, fault, time.monotonic()))
        if invalid is not None:
            return invalid
        if self._latency_s > 0:
            await asyncio.sleep(self._latency_s)
        if fault is None:
            too_long = self._over_context(body)
            return too_long or web.json_response(self.completion_body(body))
        return await self._apply(fault, body)

    def _over_context(self, body: Mapping[str, Any]) -> web.Response | None:
        """The 400 for a request over ``context_tokens``, or None."""
        if self.context_tokens is None:
            return None
        max_tokens = body.get("max_tokens") or 0
        prompt_tokens = _prompt_tokens(body["messages"])
        requested = prompt_tokens + max_tokens
        if requested <= self.context_tokens:
            return None
        if self.context_error == "vllm":
            return _vllm_context_error(self.context_tokens, prompt_tokens, max_tokens)
        return _context_length_exceeded(self.context_tokens, requested)

    async def _apply(self, fault: str, body: Mapping[str, Any]) -> web.Response:
        if fault == "429" or fault.startswith("429:"):
            value = fault[4:] if fault.startswith("429:") else self.retry_after
            headers = {} if value is None else {"Retry-After": value}
            if self.retry_after_ms is not None:
                headers["retry-after-ms"] = self.retry_after_ms
            return _error(
                429,
                "Rate limit reached for requests.",
                type_="requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if fault == "quota":
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                type_="insufficient_quota",
                code="insufficient_quota",
                headers={},
            )
        if fault == "content_filter":
            filtered = self.completion_body(body)
            filtered["choices"][0]["message"]["content"] = None
            filtered["choices"][0]["finish_reason"] = "content_filter"
            return web.json_response(filtered)
        if fault in ("blank_reply", "blank_length"):
            blank = self.completion_body(body)
            blank["choices"][0]["message"]["content"] = ""
            blank["choices"][0]["finish_reason"] = "length" if fault == "blank_length" else "stop"
            return web.json_response(blank)
        if fault == "context_length_exceeded":
            limit = self.context_tokens or 8192  # whatever was asked, it was "too long"
            return _context_length_exceeded(limit, max(limit + 1, _prompt_tokens(body["messages"])))
        if fault == "negative_usage":
            broken = self.completion_body(body)
            broken["usage"] = {"prompt_tokens": -5, "completion_tokens": -3, "total_tokens": -8}
            return web.json_response(broken)
        if fault == "timeout":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.hang_s)
            return web.json_response(self.completion_body(body))
        if fault == "malformed":
            return web.Response(body=_MALFORMED_BODY, content_type="application/json")
        if fault == "html":
            return web.Response(
                text="<html><body>Bad gateway</body></html>", content_type="text/html"
            )
        if fault == "empty_choices":
            return web.json_response(self.completion_body(body, empty=True))
        if _is_status_fault(fault):
            status = int(fault)
            type_ = "server_error" if status >= 500 else "invalid_request_error"
            return _error(status, f"Scripted fault {status}.", type_=type_)
        logger.error("fake OpenAI server: unknown fault %r", fault)
        return _error(500, f"fake OpenAI server: unknown fault {fault!r}", type_="server_error")
