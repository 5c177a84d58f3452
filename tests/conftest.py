"""Shared fixtures: the real servers integration tests run against, started once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.stacks import new_stack

from streams.embedded import ManagedProcess, start_broker, start_redis
from streams.stack import EmbeddedStack, config_variant


@pytest.fixture(scope="module")
def broker() -> Iterator[ManagedProcess]:
    """A Tansu broker (memory storage) of the test module's own, stopped after it."""
    server = start_broker()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[str, int, list[object]]]:
    """A real aiosmtpd SMTP server on loopback; yields (host, port, received envelopes)."""
    from aiosmtpd.controller import Controller

    from streams.embedded import find_free_port

    received: list[object] = []

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            received.append(envelope)
            return "250 OK"

    port = find_free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield "127.0.0.1", port, received
    finally:
        controller.stop()


@pytest.fixture(scope="session")
def pipeline_config(
    tmp_path_factory: pytest.TempPathFactory, smtp_server: tuple[str, int, list[object]]
) -> Path:
    """The bundled config with the e-mail channel pointed at the test SMTP server."""
    host, port, _ = smtp_server

    def change(raw: dict[str, Any]) -> None:
        raw["channels"]["email"]["options"].update({"host": host, "port": port})
        raw["delivery"] = {"max_attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}

    return config_variant(tmp_path_factory.mktemp("config"), change)


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pipeline_config: Path
) -> Iterator[EmbeddedStack]:
    """Tansu + redis-server + one worker, on a unique topic prefix and consumer group."""
    data_dir = tmp_path_factory.mktemp("stack")
    embedded = new_stack(data_dir, "it")
    embedded.config = pipeline_config
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()
        for log in sorted((data_dir / "logs").glob("worker-*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log} (has tracebacks) ---\n{text[-4000:]}")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[ManagedProcess]:
    """A real redis-server of the module's own, on a free loopback port."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
