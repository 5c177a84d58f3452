"""Retry delays: exponential backoff with full jitter, honouring a provider's Retry-After."""

from __future__ import annotations

import math
import random

__all__ = ["backoff_delay"]

_RNG = random.Random()
_MAX_EXPONENT = 1023  # 2.0 ** 1024 overflows a float; the cap is reached long before


def backoff_delay(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    rng: random.Random | None = None,
    retry_after_s: float | None = None,
) -> float:
    """Return how long to wait before retry number ``attempt``, in seconds.

    "Full jitter" from the AWS Architecture Blog, *Exponential Backoff And Jitter* (2015):
    ``uniform(0, min(max_s, initial_s * 2 ** attempt))``. Spreading retries over the whole
    window keeps many clients that failed together from retrying together. When the provider
    asked for a wait (``Retry-After``), the delay is ``max(retry_after_s, jittered)``: never
    sooner than asked. ``retry_after_s`` is not capped by ``max_s``.

    Args:
        attempt: Retries already made, from 0 (first retry waits up to ``initial_s``).
        initial_s: Window of the first retry, seconds (> 0).
        max_s: Cap of the window, seconds (> 0; below ``initial_s`` it caps every window).
        rng: Source of randomness (seed one in tests); a module-level ``Random`` when None.
        retry_after_s: The provider's requested wait, seconds; negative values count as 0.

    Returns:
        A delay in seconds, ``0 <= delay <= max(max_s, retry_after_s)``.

    Raises:
        ValueError: ``attempt`` < 0, ``initial_s`` or ``max_s`` <= 0, or a value is not
            finite.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not (math.isfinite(initial_s) and initial_s > 0):
        raise ValueError(f"initial_s must be a finite number > 0, got {initial_s}")
    if not (math.isfinite(max_s) and max_s > 0):
        raise ValueError(f"max_s must be a finite number > 0, got {max_s}")
    window = min(max_s, initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    jittered = (rng or _RNG).uniform(0.0, window)
    if retry_after_s is None:
        return jittered
    if not math.isfinite(retry_after_s):
        raise ValueError(f"retry_after_s must be finite, got {retry_after_s}")
    return max(retry_after_s, jittered)
