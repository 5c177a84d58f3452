"""Embedded stacks for integration tests: a config variant, a unique topic prefix and group."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streams.stack import EmbeddedStack, config_variant

__all__ = ["new_stack", "running_stack"]


def new_stack(
    directory: Path,
    name: str,
    change: Callable[[dict[str, Any]], None] = lambda raw: None,
    *,
    extra_env: dict[str, str] | None = None,
) -> EmbeddedStack:
    """A one-worker stack (not started) on ``<name>-<random>`` topics and consumer group, with
    the bundled config changed by ``change``."""
    unique = f"{name}-{uuid.uuid4().hex[:8]}"
    return EmbeddedStack(
        workers=1,
        data_dir=directory,
        topic_prefix=unique,
        app_id=unique,
        config=config_variant(directory, change),
        extra_env=extra_env or {},
    )


def running_stack(directory: Path, name: str, config: Path) -> Iterator[EmbeddedStack]:
    """Yield a started one-worker stack (``new_stack``) running ``config``; stop it after.

    For a module's stack of its own: ``yield from running_stack(...)`` in a fixture."""
    embedded = new_stack(directory, name)
    embedded.config = config
    with embedded:
        yield embedded
