"""``streams.agents.llm.answer`` on a real Runtime: what a turn gets when an engine misbehaves.

The engines are the bundled local engine and, where a test needs one, an engine that raises
something other than ``EngineError`` (an engine bug, or an HTTP-stack error a client did not
wrap), wrapped in the real ``ResilientEngine``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from connectors.llm.base import Completion, CompletionRequest, LLMEngine
from connectors.llm.resilient import ResilientEngine
from schemas.models import ChatMessage, LLMRequest, LLMStatus, Role, utcnow
from streams.agents.llm import answer
from streams.runtime import Runtime
from streams.settings import Settings, load_config
from streams.stack import config_variant

QUESTION = "My mouse is not responding."


class Broken(LLMEngine):
    """An engine whose every call raises ``RuntimeError`` (not an ``EngineError``)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        raise RuntimeError("TLS stream ended")


def runtime(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Runtime:
    return Runtime(Settings(data_dir=tmp_path), load_config(config_variant(tmp_path, change)))


def with_broken_engine(rt: Runtime) -> Broken:
    broken = Broken()
    rt.engines["gpt"] = ResilientEngine(broken, rt.config.engines["gpt"])
    return broken


def request(persona: str = "support") -> LLMRequest:
    now = utcnow()
    return LLMRequest(
        request_id="t1:0",
        conversation_id="c1",
        tenant="acme",
        turn_id="t1",
        persona=persona,
        messages=[ChatMessage(role=Role.USER, content=QUESTION)],
        created_at=now,
        deadline_at=now + timedelta(seconds=60),
    )


async def test_an_engine_raising_an_unexpected_error_falls_back_to_the_next(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {"kind": "local"}
        raw["personas"]["support"]["engines"] = ["gpt", "local"]

    rt = runtime(tmp_path, change)
    broken = with_broken_engine(rt)

    response = await answer(rt, request())

    assert broken.calls == 1
    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "local", 2)
    assert response.content == "Try plugging it into another USB port or changing the batteries."


async def test_an_unexpected_error_of_the_only_engine_is_handed_off_when_configured(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["gpt"] = {"kind": "local"}
        raw["personas"]["support"]["engines"] = ["gpt"]
        raw["llm"] = {"on_failure": "handoff"}

    rt = runtime(tmp_path, change)
    with_broken_engine(rt)

    response = await answer(rt, request())

    assert response.status == LLMStatus.ESCALATED
    assert (response.error or "").startswith("no answer: ")
    assert "unexpected RuntimeError: TLS stream ended" in (response.error or "")
    assert response.content == rt.config.personas["support"].handoff_reply


async def test_an_engine_whose_context_leaves_no_room_for_the_user_is_skipped(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        # 256 tokens of context, 300 reserved for the reply: nothing left for the prompt
        raw["engines"]["tiny"] = {"kind": "local", "context_tokens": 256, "max_tokens": 300}
        raw["personas"]["support"]["engines"] = ["tiny", "local"]

    rt = runtime(tmp_path, change)

    response = await answer(rt, request())

    assert (response.status, response.engine, response.attempts) == (LLMStatus.OK, "local", 1)


async def test_when_every_engine_is_skipped_the_turn_gets_the_apology_naming_why(
    tmp_path: Path,
) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["tiny"] = {"kind": "local", "context_tokens": 256, "max_tokens": 300}
        raw["personas"]["support"]["engines"] = ["tiny"]

    rt = runtime(tmp_path, change)

    response = await answer(rt, request())

    assert response.status == LLMStatus.FALLBACK
    assert response.content == rt.config.personas["support"].apology_reply
    assert "no room for the user's message" in (response.error or "")
