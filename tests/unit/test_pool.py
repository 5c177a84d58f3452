"""``streams.pool.CallPool``: the LLM stage's bounded, self-refilling pool of calls."""

from __future__ import annotations

import asyncio

import pytest

from streams.pool import CallPool


async def _drain(pool: CallPool[int]) -> None:
    while pool.tasks:
        await asyncio.wait(set(pool.tasks))


async def test_never_more_than_limit_calls_and_every_item_runs_once() -> None:
    running = peak = 0
    done: list[int] = []

    async def call(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (item % 3))
        running -= 1
        done.append(item)

    pool = CallPool(4, call, waiting_max=3)
    for item in range(50):
        await pool.submit(item)
        assert pool.busy <= 4
        assert pool.waiting <= 3
    await _drain(pool)
    assert peak == 4
    assert sorted(done) == list(range(50))
    assert (pool.busy, pool.waiting) == (0, 0)


async def test_calls_that_never_suspend_leave_nothing_behind() -> None:
    # A call answered without any await (an LLM turn declined by a business rule) finishes
    # in its task's first step; a queued item must still find a task or a free slot.
    done: list[int] = []

    async def call(item: int) -> None:
        done.append(item)

    pool = CallPool(2, call, waiting_max=2)
    # Two run, two wait, the fifth blocks: by the time it goes on, every task has emptied the
    # queue and stopped, so it must start a task of its own rather than wait in the queue.
    for item in range(5):
        await pool.submit(item)
    await _drain(pool)
    assert sorted(done) == list(range(5))
    assert pool.waiting == 0


async def test_a_failing_call_does_not_stop_the_pool() -> None:
    done: list[int] = []

    async def call(item: int) -> None:
        await asyncio.sleep(0)
        if item % 2:
            raise RuntimeError(f"item {item} failed")
        done.append(item)

    pool = CallPool(2, call, waiting_max=2)
    for item in range(20):
        await pool.submit(item)
    await _drain(pool)
    assert done == list(range(0, 20, 2))
    assert (pool.busy, pool.waiting) == (0, 0)


async def test_submit_blocks_while_every_slot_is_busy_and_the_queue_is_full() -> None:
    release = asyncio.Event()

    async def call(item: int) -> None:
        await release.wait()

    pool = CallPool(2, call, waiting_max=1)
    for item in range(3):  # two run, one waits
        await pool.submit(item)
    blocked = asyncio.create_task(pool.submit(3))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    release.set()
    await asyncio.wait_for(blocked, 1)
    await _drain(pool)
    assert (pool.busy, pool.waiting) == (0, 0)


async def test_a_finished_call_takes_the_next_waiting_item_in_its_own_task() -> None:
    busy: list[int] = []
    order: list[int] = []

    async def call(item: int) -> None:
        await asyncio.sleep(0)
        order.append(item)

    pool = CallPool(1, call, waiting_max=10, on_busy=busy.append)
    for item in range(5):
        await pool.submit(item)
    await _drain(pool)
    assert order == [0, 1, 2, 3, 4]
    assert busy == [1, 0]  # one task ran the whole chain, the slot was never handed back


async def test_drain_finishes_the_queue_or_cancels_and_counts_what_is_left() -> None:
    async def quick(item: int) -> None:
        await asyncio.sleep(0.001)

    pool = CallPool(1, quick, waiting_max=5)
    for item in range(4):
        await pool.submit(item)
    assert await pool.drain(1.0) == 0  # the running call took the three waiting ones

    async def stuck(item: int) -> None:
        await asyncio.sleep(60)

    pool = CallPool(1, stuck, waiting_max=5)
    for item in range(3):
        await pool.submit(item)
    assert await pool.drain(0.05) == 3  # one cancelled call, two never started
    assert pool.tasks == set()


async def test_busy_count_is_reported_on_every_change() -> None:
    seen: list[int] = []

    async def call(item: int) -> None:
        await asyncio.sleep(0)

    pool = CallPool(2, call, on_busy=seen.append)
    for item in range(2):
        await pool.submit(item)
    await _drain(pool)
    assert seen == [1, 2, 1, 0]


def test_limits_must_be_positive() -> None:
    async def call(item: int) -> None: ...

    with pytest.raises(ValueError, match="must be >= 1"):
        CallPool(0, call)
    with pytest.raises(ValueError, match="must be >= 1"):
        CallPool(1, call, waiting_max=0)
