"""The OpenAI-compatible engine: one Chat Completions call per request, errors as EngineError."""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from connectors.errors import EngineError
from connectors.llm.base import (
    Completion,
    CompletionRequest,
    ContextLengthExceeded,
    LLMEngine,
    RejectedCompletion,
    Usage,
)
from connectors.llm.local import estimate_tokens
from processors.config import EngineConfig
from schemas.models import ChatMessage, Role

__all__ = ["DEFAULT_BASE_URL", "OpenAIEngine", "build_openai_engine", "parse_retry_after"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
"""Endpoint used when neither the config nor ``OPENAI_BASE_URL`` names one."""

_NO_KEY = "no-key-required"
_RETRIABLE_4XX = frozenset({408, 409, 429})  # as openai-python's own _should_retry
_CONTEXT_CODE = "context_length_exceeded"
_CONTEXT_MESSAGE = "maximum context length"  # OpenAI's message, also sent with other codes
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)
_COMPLETION_SHARE = re.compile(r"(\d+) in the completion", re.IGNORECASE)
_MAX_TOKENS_TOO_LARGE = re.compile(r"is too large: (\d+)", re.IGNORECASE)


def parse_retry_after(
    headers: Mapping[str, str], *, now: Callable[[], float] = time.time
) -> float | None:
    """Return how long a response asks the client to wait, in seconds, or None.

    ``retry-after-ms`` (OpenAI's non-standard header, milliseconds) wins over ``Retry-After``,
    which is read per RFC 9110 §10.2.3: either delay-seconds or an HTTP-date. Fractional
    seconds (``"0.2"``) are accepted, as OpenAI-compatible servers send them. A date in the
    past gives 0; unparsable or non-finite values are ignored.

    Args:
        headers: Response headers (any case).
        now: Wall clock (epoch seconds) an HTTP-date is measured against.

    Returns:
        Seconds to wait (>= 0), or None when no usable header is present.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = lowered.get(name)
        if raw is None:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            continue
        if math.isfinite(value):
            return max(0.0, value / divisor)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, RFC 5322 §3.3
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role is Role.SYSTEM:
        return {"role": "system", "content": message.content}
    if message.role is Role.ASSISTANT:
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}


def _error_object(exc: openai.APIStatusError) -> Mapping[str, Any]:
    """The error object of ``exc``'s body, or an empty mapping (a body that is not JSON).

    The client sets ``exc.body`` to the ``"error"`` member of a body ``{"error": {...}}``
    (OpenAI's shape; openai-python's ``_make_status_error``), and to the whole body otherwise
    (vLLM's ``{"object": "error", "message": ..., "code": 400}``); older clients may hand over
    the whole body either way, so both are read.
    """
    body = exc.body
    if not isinstance(body, Mapping):
        return {}
    inner = body.get("error")
    return inner if isinstance(inner, Mapping) else body


def _completion_alone_too_long(message: str) -> bool:
    """Whether the error message says ``max_tokens`` alone reaches the model's context.

    vLLM (and DeepSeek) word both cases with OpenAI's phrase "maximum context length is N
    tokens", naming the completion's share: "However, you requested T tokens (P in the
    messages, C in the completion)", or "'max_tokens' or 'max_completion_tokens' is too
    large: C. This model's maximum context length is N tokens ...". When C >= N no prompt,
    however short, fits: that is not a prompt overflow.
    """
    limit = _CONTEXT_LIMIT.search(message)
    cap = _COMPLETION_SHARE.search(message) or _MAX_TOKENS_TOO_LARGE.search(message)
    return limit is not None and cap is not None and int(cap.group(1)) >= int(limit.group(1))


def _is_context_overflow(exc: openai.APIStatusError) -> bool:
    """A 400 saying the prompt exceeds the model's context (see ``ContextLengthExceeded``).

    Read from the error object itself, not ``exc.message`` (which the client builds from the
    status and, depending on its version, the whole body): its ``code`` is
    ``context_length_exceeded``, or its own ``message`` says "maximum context length"; unless
    that message says the completion cap alone exceeds the context
    (:func:`_completion_alone_too_long`), which a shorter prompt cannot fix.
    """
    if exc.status_code != 400:
        return False
    error = _error_object(exc)
    message = error.get("message")
    if not isinstance(message, str):
        message = exc.body if isinstance(exc.body, str) else ""
    if _completion_alone_too_long(message):
        return False
    code = error.get("code") or getattr(exc, "code", None)
    return code == _CONTEXT_CODE or _CONTEXT_MESSAGE in message.lower()


def _map_error(exc: openai.OpenAIError, model: str) -> EngineError:
    """Translate an ``openai`` exception into an EngineError saying whether to retry."""
    where = f"openai {model!r}"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if _is_context_overflow(exc):
            return ContextLengthExceeded(
                f"{where}: prompt longer than the model's context (HTTP 400 "
                f"{_CONTEXT_CODE}): {exc.message}"
            )
        retry_after = parse_retry_after(exc.response.headers)
        retriable = status >= 500 or status in _RETRIABLE_4XX
        reason = "rate limited" if status == 429 else "HTTP error"
        if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
            retriable, reason = False, "out of quota (billing), not rate limited:"
        return EngineError(
            f"{where}: {reason} {status}: {exc.message}",
            retriable=retriable,
            retry_after=retry_after if retriable else None,
            rate_limited=status == 429 and retriable,
        )
    if isinstance(exc, openai.APITimeoutError):
        return EngineError(f"{where}: request timed out", retriable=True)
    if isinstance(exc, openai.APIConnectionError):
        return EngineError(f"{where}: connection failed: {exc.message}", retriable=True)
    if isinstance(exc, openai.APIResponseValidationError):
        return EngineError(
            f"{where}: HTTP 200 with a body that does not match the Chat Completions schema "
            "(a flaky proxy?)",
            retriable=True,
        )
    return EngineError(f"{where}: {type(exc).__name__}: {exc}", retriable=False)


def _malformed(model: str, detail: str) -> EngineError:
    return EngineError(
        f"openai {model!r}: HTTP 200 with a malformed body ({detail}); a flaky proxy?",
        retriable=True,
    )


def _reported_counts(response: ChatCompletion) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` of the ``usage`` block, None where not sent.

    A negative count (a proxy's bug) reads as 0 rather than failing the answered turn.
    """
    usage = response.usage
    counts = (getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None))
    prompt, completion = (max(0, n) if isinstance(n, int) else None for n in counts)
    return prompt, completion


def _rejected(
    message: str, *, retriable: bool, model: str, counts: tuple[int | None, int | None]
) -> EngineError:
    """The error of an answer not used: a ``RejectedCompletion`` carrying the tokens billed to
    ``model`` when the response reported any (``counts``, from :func:`_reported_counts`; a
    count not sent reads 0), else a plain ``EngineError``."""
    prompt, completion = counts
    if prompt is None and completion is None:
        return EngineError(message, retriable=retriable)
    usage = Usage(model, prompt or 0, completion or 0)
    return RejectedCompletion(message, retriable=retriable, usage=usage)


def _to_completion(response: Any, request: CompletionRequest, model: str) -> Completion:
    """Map a ChatCompletion to a Completion, checking only what is read (see OpenAIEngine).

    Raises:
        EngineError: The body is not a usable completion; a ``RejectedCompletion`` carrying
            the tokens billed when the body is a chat completion with ``usage``.
    """
    if not isinstance(response, ChatCompletion):
        raise _malformed(model, f"not a chat.completion: {type(response).__name__}")
    if isinstance(response.model, str) and response.model:
        model = response.model
    counts = _reported_counts(response)
    choices: Any = response.choices
    if choices is not None and not isinstance(choices, list):
        raise _malformed(model, "'choices' is not a list")
    if not choices:
        raise _rejected(
            f"openai {model!r}: empty choices", retriable=True, model=model, counts=counts
        )
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    refusal = getattr(message, "refusal", None)
    if content is None and isinstance(refusal, str) and refusal:
        raise _rejected(
            f"openai {model!r}: model refused: {refusal}",
            retriable=False,
            model=model,
            counts=counts,
        )
    finish_reason = getattr(choices[0], "finish_reason", None)
    if not content and finish_reason == "content_filter":
        raise _rejected(
            f"openai {model!r}: reply withheld by the content filter",
            retriable=False,
            model=model,
            counts=counts,
        )
    if not isinstance(content, str):
        raise _rejected(
            f"openai {model!r}: empty choices (no content)",
            retriable=True,
            model=model,
            counts=counts,
        )
    if not content.strip():  # a blank reply answers nothing: the next engine should
        if finish_reason == "length":  # e.g. a reasoning model spent max_tokens thinking
            raise _rejected(
                f"openai {model!r}: blank reply, max_tokens reached (finish_reason 'length')",
                retriable=False,
                model=model,
                counts=counts,
            )
        raise _rejected(
            f"openai {model!r}: blank reply", retriable=True, model=model, counts=counts
        )
    prompt_tokens, completion_tokens = counts
    return Completion(
        content=content,
        model=model,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        prompt_tokens=prompt_tokens
        if prompt_tokens is not None
        else sum(estimate_tokens(m.content) for m in request.messages),
        completion_tokens=completion_tokens
        if completion_tokens is not None
        else estimate_tokens(content),
    )


class OpenAIEngine(LLMEngine):
    """Answers through an OpenAI-compatible Chat Completions endpoint, one HTTP call per request.

    The call follows the OpenAI API reference, *Chat > Create chat completion*: ``model``,
    ``messages`` (``[{"role", "content"}]``), and ``temperature`` / ``max_tokens`` when set
    (the request's values win over the config's). The client does no retries
    (``max_retries=0``); wrap the engine in ``connectors.llm.resilient.ResilientEngine``.

    Errors are ``EngineError``: 429 (with ``retry_after`` from ``retry-after-ms`` /
    ``Retry-After``), 408, 409 and 5xx, timeouts, connection failures, a 200 whose body is not
    JSON or not a chat completion, empty ``choices`` / ``content`` and any other exception of
    the HTTP stack are retriable; other 4xx (400, 401, 403, 404, 422), a 429 whose ``code`` is
    ``insufficient_quota`` (billing, not rate), a refusal, an empty reply stopped by the
    content filter and a missing model are not. A 400 whose error object has code
    ``context_length_exceeded`` or a message saying "maximum context length" is a
    ``ContextLengthExceeded``, unless that message says ``max_tokens`` alone is at least the
    context (vLLM's "..., C in the completion"), a plain non-retriable 400. A chat
    completion that is rejected (empty choices or content, blank, refused, filtered) while its
    body reports ``usage`` raises a ``RejectedCompletion`` carrying those tokens: the provider
    bills them. Token counts come from ``usage`` (negative counts read as 0), or are estimated
    (``connectors.llm.local.estimate_tokens``) when the server sends none.

    Args:
        cfg: Model, sampling defaults and ``timeout_s`` (per HTTP call, s).
        api_key: Bearer token; None for an endpoint that needs none (a placeholder is sent).
            Never read from the environment here (see :func:`build_openai_engine`).
        base_url: Endpoint, e.g. ``http://127.0.0.1:8000/v1``; None = ``DEFAULT_BASE_URL``.
    """

    name = "openai"

    def __init__(self, cfg: EngineConfig, *, api_key: str | None, base_url: str | None) -> None:
        self._cfg = cfg
        self._client = openai.AsyncOpenAI(
            api_key=api_key or _NO_KEY,
            base_url=base_url or DEFAULT_BASE_URL,
            timeout=cfg.timeout_s,
            max_retries=0,
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        """Ask the endpoint once.

        Args:
            request: The prompt; ``model`` '' means ``cfg.model``.

        Returns:
            The first choice's content, the answering model, finish reason and token counts.

        Raises:
            EngineError: On any failure; ``retriable`` and ``retry_after`` say what to do.
        """
        model = request.model or self._cfg.model
        if not model:
            raise EngineError("openai: no model (EngineConfig.model is empty)", retriable=False)
        temperature = request.temperature
        if temperature is None:
            temperature = self._cfg.temperature
        max_tokens = request.max_tokens or self._cfg.max_tokens
        try:
            response = await self._client.chat.completions.create(
                model=model,
                messages=[_message_param(m) for m in request.messages],
                temperature=openai.omit if temperature is None else temperature,
                max_tokens=openai.omit if max_tokens is None else max_tokens,
            )
        except openai.OpenAIError as exc:
            error = _map_error(exc, model)
            logger.debug("openai call failed: %s (retriable=%s)", error, error.retriable)
            raise error from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _malformed(model, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # e.g. an anyio/TLS error the client does not wrap
            raise EngineError(
                f"openai {model!r}: {type(exc).__name__}: {exc}", retriable=True
            ) from exc
        return _to_completion(response, request, model)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.close()


def build_openai_engine(cfg: EngineConfig, env: Mapping[str, str]) -> OpenAIEngine:
    """Build an :class:`OpenAIEngine` from its config and the process environment.

    Args:
        cfg: The engine config; ``cfg.api_key_env`` names the variable holding the key.
        env: The environment (``os.environ`` at the entry point).

    Returns:
        The engine, on ``cfg.base_url``, else ``env["OPENAI_BASE_URL"]``, else
        ``DEFAULT_BASE_URL``.

    Raises:
        ValueError: The key variable is unset or empty.
    """
    api_key = env.get(cfg.api_key_env, "")
    if not api_key:
        raise ValueError(
            f"the openai engine needs an API key: environment variable {cfg.api_key_env} "
            "is not set (EngineConfig.api_key_env names it)"
        )
    base_url = cfg.base_url or env.get("OPENAI_BASE_URL") or None
    return OpenAIEngine(cfg, api_key=api_key, base_url=base_url)
