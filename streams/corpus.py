"""Simulated users built from the real dialogs of the ``chatterbot-corpus`` package.

Each simulated user replays the user side (turns 0, 2, 4, …) of one corpus dialog in its own
conversation; users are interleaved turn by turn, so many conversations are in flight at once
and a user's next turn often arrives before the previous one is answered.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connectors.llm.knowledge_loader import load_dialogs

__all__ = ["DEMO_SOURCES", "DemoSource", "simulated_users"]


@dataclass(frozen=True)
class DemoSource:
    """A corpus file and the metadata its users send (``lang`` drives the routing rules)."""

    source: str
    lang: str
    weight: int


DEMO_SOURCES: tuple[DemoSource, ...] = (
    DemoSource("chatterbot:english/tech_support", "en", 4),
    DemoSource("chatterbot:english/computers", "en", 2),
    DemoSource("chatterbot:english/greetings", "en", 3),
    DemoSource("chatterbot:spanish/greetings", "es", 1),
    DemoSource("chatterbot:german/greetings", "de", 1),
    DemoSource("chatterbot:french/greetings", "fr", 1),
    DemoSource("chatterbot:portuguese/greetings", "pt", 1),
)


def simulated_users(
    users: int,
    *,
    seed: int = 7,
    tenant: str = "demo",
    sources: Sequence[DemoSource] = DEMO_SOURCES,
) -> list[dict[str, Any]]:
    """InboundMessage-shaped dicts for ``users`` simulated users, interleaved turn by turn.

    Returns:
        JSON-ready dicts (no message_id / created_at: ``switchboard replay`` stamps them).
    """
    rng = random.Random(seed)
    dialogs = {s.source: [d for d in load_dialogs(s.source) if d] for s in sources}
    weighted = [s for s in sources for _ in range(s.weight)]
    scripts: list[list[dict[str, Any]]] = []
    for user in range(users):
        src = weighted[user % len(weighted)]
        dialog = rng.choice(dialogs[src.source])
        conversation = f"{tenant}-user-{user:05d}"
        turns = []
        for index, text in enumerate(dialog[0::2]):
            turns.append(
                {
                    "tenant": tenant,
                    "channel": "chat",
                    "sender": f"user-{user:05d}@{src.lang}.demo",
                    "content": text,
                    "conversation_id": conversation,
                    "metadata": {"lang": src.lang, "corpus": src.source, "turn": str(index)},
                }
            )
        scripts.append(turns)
    out: list[dict[str, Any]] = []
    depth = max((len(s) for s in scripts), default=0)
    for turn in range(depth):
        out.extend(script[turn] for script in scripts if turn < len(script))
    return out
