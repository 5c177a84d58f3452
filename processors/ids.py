"""Sortable message ids: creation time first, then priority, then randomness.

Lexicographic order of the ids is creation order (ms resolution), as with the time-and-priority
ids of Rustic AI's GemstoneID (seed document 003) or ULID; ties within one millisecond order
critical before low.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from schemas.models import Priority

__all__ = ["id_timestamp_ms", "new_message_id"]

_PRIORITY_DIGIT = {
    Priority.CRITICAL: "0",
    Priority.HIGH: "1",
    Priority.MEDIUM: "2",
    Priority.LOW: "3",
}


def new_message_id(now: datetime, priority: Priority = Priority.MEDIUM) -> str:
    """A 26-character id: 12 hex digits of epoch ms, a priority digit, 13 random hex digits."""
    ms = int(now.timestamp() * 1000)
    return f"{ms:012x}{_PRIORITY_DIGIT[priority]}{secrets.token_hex(7)[:13]}"


def id_timestamp_ms(message_id: str) -> int:
    """The epoch ms encoded in an id made by ``new_message_id``.

    Raises:
        ValueError: the id was not made by ``new_message_id``.
    """
    if len(message_id) != 26:
        raise ValueError(f"not a switchboard message id: {message_id!r}")
    return int(message_id[:12], 16)
