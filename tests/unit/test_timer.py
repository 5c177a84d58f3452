"""The conversation timer keeps running when a round of ticks fails.

Before, ``ticks()`` had no error handling: one send that raised (e.g. ``KafkaTimeoutError``
when the producer's buffer stayed full for ``request_timeout_ms`` while the broker was away)
ended the timer task, and the worker exited with status 1.
"""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from prometheus_client import REGISTRY

from streams.agents.conversation import TIMER_STAGE, _tick_acknowledged, run_timer


def _errors(error_type: str) -> float:
    labels = {"stage": TIMER_STAGE, "error_type": error_type}
    return REGISTRY.get_sample_value("switchboard_stage_errors_total", labels) or 0.0


async def test_a_failed_round_is_counted_and_the_next_rounds_run() -> None:
    before = _errors("KafkaTimeoutError")
    rounds: list[int] = []
    three = asyncio.Event()

    async def tick_round() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise KafkaTimeoutError()
        if len(rounds) == 3:
            three.set()

    timer = asyncio.create_task(run_timer(tick_round, 0.01))
    await asyncio.wait_for(three.wait(), timeout=5.0)
    assert not timer.done()  # before: the task ended with the first round's exception
    timer.cancel()
    await asyncio.gather(timer, return_exceptions=True)
    assert rounds[:3] == [0, 1, 2]
    assert _errors("KafkaTimeoutError") == before + 1


async def test_cancelling_the_timer_stops_it() -> None:
    async def tick_round() -> None:
        await asyncio.sleep(10)

    timer = asyncio.create_task(run_timer(tick_round, 0.0))
    await asyncio.sleep(0.01)
    timer.cancel()
    done, _ = await asyncio.wait({timer}, timeout=1.0)
    assert timer in done
    assert timer.cancelled()


async def test_a_tick_the_broker_refused_is_counted() -> None:
    before = _errors("NotLeaderForPartitionError")
    loop = asyncio.get_running_loop()
    refused, acknowledged = loop.create_future(), loop.create_future()
    refused.set_exception(NotLeaderForPartitionError())
    acknowledged.set_result(None)
    for ack in (refused, acknowledged):
        _tick_acknowledged(ack)
    assert _errors("NotLeaderForPartitionError") == before + 1
