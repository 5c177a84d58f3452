"""Sortable message ids: creation time first, then priority, then randomness.

Lexicographic order of the ids is creation order (ms resolution), as with the time-and-priority
ids of Rustic AI's GemstoneID (seed document 003) or ULID; ties within one millisecond order
critical before low.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime

from schemas.models import Priority

__all__ = ["id_timestamp_ms", "new_message_id", "scoped_id"]

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


def scoped_id(base: str, *scope: str) -> str:
    """``base`` made unique across scopes: ``<base>@<16 hex digits>``.

    The digits are the first 64 bits of SHA-256 over the JSON array of ``scope`` (e.g. tenant
    and conversation id), so the same inputs give the same id on every replay (the delivery
    stage's idempotency key) while two tenants reusing a message id, or two conversations
    reusing a turn id, get different ids. JSON keeps the parts apart: ``("a/b", "c")`` and
    ``("a", "b/c")`` differ.
    """
    digest = hashlib.sha256(json.dumps(scope).encode()).hexdigest()[:16]
    return f"{base}@{digest}"
