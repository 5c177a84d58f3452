"""Errors raised by connectors; each says whether the caller should retry, and when."""

from __future__ import annotations

__all__ = ["ConnectorError", "DeliveryError", "EngineError"]


class ConnectorError(Exception):
    """Root of connector errors.

    Attributes:
        retriable: True when the same call may succeed later (timeouts, 429, 5xx).
        retry_after: Seconds the provider asked us to wait (``Retry-After``), if any.
    """

    def __init__(self, message: str, *, retriable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after = retry_after


class DeliveryError(ConnectorError):
    """A delivery connector could not hand the message to its channel."""


class EngineError(ConnectorError):
    """An LLM engine could not produce a completion.

    Attributes:
        rate_limited: The provider refused the call for its rate limit (HTTP 429), with or
            without ``retry_after``; every call to that provider should slow down.
        deadline_passed: Given up because the turn's deadline passed (or a retry would end
            past it), not because the engine failed for good: the turn's re-issue owns it.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        rate_limited: bool = False,
        deadline_passed: bool = False,
    ) -> None:
        super().__init__(message, retriable=retriable, retry_after=retry_after)
        self.rate_limited = rate_limited
        self.deadline_passed = deadline_passed
