"""SIGKILL the worker twice mid-replay: every turn still gets exactly one reply, in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.stacks import new_stack

from streams.bench import conversation_lines
from streams.replay import replay
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration

CONVERSATIONS = 60
TURNS = 5


@pytest.fixture
def crash_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    def change(raw: dict[str, Any]) -> None:
        raw["conversation"]["llm_deadline_s"] = 4  # re-issue turns lost with a killed worker
        raw["engines"]["local"]["latency_s"] = 0.05  # keep calls in flight when the kill lands

    stack = new_stack(tmp_path, "crash", change)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def test_turn_is_answered_once_and_in_order_after_worker_is_killed_twice(
    crash_stack: EmbeddedStack,
) -> None:
    stack = crash_stack
    stack.wait_ready()
    lines = conversation_lines(CONVERSATIONS, TURNS, tenant="crash")
    total = len(lines)
    kills: list[int] = []

    def chaos(accounted: int, _: int) -> None:
        # Kill at two different points of the run, restart at once (the broker stays up).
        for threshold in (total // 5, total * 3 // 5):
            if accounted >= threshold and threshold not in kills:
                kills.append(threshold)
                stack.worker_procs[0].kill()
                stack.start_worker(0)
        stack.check_workers()

    result = asyncio.run(replay(stack.settings(), lines, timeout_s=180, on_progress=chaos))
    summary = result.summary()
    assert len(kills) == 2, f"the run ended before both kills: {summary}"
    assert summary["unaccounted"] == 0, summary
    assert summary["replies_delivered"] == total, summary

    published, delivered = result.orders(stack.data_dir / "outbox.jsonl")
    # exactly one reply per turn (no duplicates, none missing), in the order the turns arrived
    assert delivered == published


def test_stopping_worker_finishes_its_llm_calls_in_flight(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["engines"]["local"]["latency_s"] = 2.0  # the call is in flight when SIGTERM lands
        raw["conversation"]["llm_deadline_s"] = 600  # a re-issue would come far too late

    stack = new_stack(tmp_path, "drain", change)
    stack.start()
    try:
        stack.wait_ready(timeout_s=60)
        line = {
            "tenant": "drain",
            "channel": "chat",
            "sender": "d@drain.test",
            "content": "My mouse is not responding.",
        }
        stopped: list[bool] = []

        def stop_mid_call(accounted: int, _: int) -> None:
            if not stopped:
                time.sleep(0.8)  # ingest and conversation done, the LLM call is running
                stopped.append(True)
                stack.worker_procs[0].stop()  # SIGTERM, not SIGKILL
                stack.start_worker(0)

        result = asyncio.run(
            replay(stack.settings(), [line], timeout_s=60, on_progress=stop_mid_call)
        )
    finally:
        stack.stop()
    (outcome,) = result.outcomes.values()
    assert stopped
    assert outcome.report is not None, "the reply was lost with the stopped worker"
    assert outcome.report.content == (
        "Try plugging it into another USB port or changing the batteries."
    )
