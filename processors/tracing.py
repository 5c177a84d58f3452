"""W3C Trace Context ``traceparent`` values carried in Kafka headers through every stage.

Spec: https://www.w3.org/TR/trace-context/#traceparent-header
(``00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>``).
"""

from __future__ import annotations

import random
import re

__all__ = ["TRACEPARENT", "child_traceparent", "new_traceparent", "parse_traceparent"]

TRACEPARENT = "traceparent"
_PATTERN = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _random_id(bits: int) -> str:
    """A random non-zero id as ``bits // 4`` lowercase hex digits.

    Trace Context asks for ids that are unique and random enough to be, not for secret ones,
    so the Mersenne Twister does; ``secrets`` cost a system call per id, on every record.
    """
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


def new_traceparent() -> str:
    """A fresh, sampled traceparent with random trace and span ids."""
    return f"00-{_random_id(128)}-{_random_id(64)}-01"


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, str] | None:
    """Return (trace_id, parent_id, flags), or None when absent or malformed.

    All-zero trace or parent ids are invalid per the spec and give None.
    """
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    match = _PATTERN.match(text.strip().lower())
    if match is None:
        return None
    trace_id, parent_id, flags = match.groups()
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags


def child_traceparent(parent: str | bytes | None) -> str:
    """The traceparent a stage sends on: same trace id, a new span id; a new trace if none."""
    parsed = parse_traceparent(parent)
    if parsed is None:
        return new_traceparent()
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{_random_id(64)}-{flags}"
