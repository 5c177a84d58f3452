"""Polling for a condition in async tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["until"]


async def until(done: Callable[[], bool], timeout_s: float, *, poll_s: float = 0.05) -> bool:
    """Wait until ``done()`` is true, at most ``timeout_s`` seconds, polling every ``poll_s``;
    return ``done()``'s last value (the caller asserts on it, saying what was awaited)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True
