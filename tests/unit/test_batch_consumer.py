"""``BatchConsumer``'s ordering guarantees, without a broker: offsets are committed only after
a batch's records were acknowledged and its after-actions ran, also when partitions are
revoked in between (a rebalance on Tansu takes seconds, so the integration tests cannot catch
a revoke that commits too early).

The aiokafka consumer is never started; its ``commit`` is replaced by a recorder, and the
handler's delivery reports are futures the test resolves. Where the test needs fetching,
pausing and resuming, ``Partitions`` stands in for them (as aiokafka does, it hands out
nothing of a paused partition and keeps its position).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, RequestTimedOutError
from support.records import consumed

from connectors.redis_store import StoreError
from streams.settings import Settings
from streams.transport import (
    BatchAbandoned,
    BatchConsumer,
    _all_acknowledged,
    after_acknowledged,
    is_transient,
    track_acknowledgement,
)

TP = TopicPartition("in", 0)


def _record(offset: int) -> ConsumerRecord[bytes, bytes]:
    return consumed(TP.topic, TP.partition, offset, b"v")


class Harness:
    """A stage whose handler leaves one pending delivery report and one after-action."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.acks: list[asyncio.Future[Any]] = []
        self.consumer = BatchConsumer(Settings(), "test", [TP.topic], self.handle)
        self.consumer.assigned = {TP}

        async def commit(offsets: dict[TopicPartition, Any]) -> None:
            self.events.append(f"commit {offsets[TP].offset}")

        self.consumer.consumer.commit = commit  # type: ignore[method-assign]

    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        track_acknowledgement(ack)
        last = records[-1].offset

        async def after() -> None:
            self.events.append(f"after {last}")

        after_acknowledged(after)
        self.events.append(f"handled {last}")


async def test_revoke_waits_for_acknowledgements_and_after_actions_before_committing() -> None:
    h = Harness()
    await h.consumer._handle({TP: [_record(4), _record(5)]}, h.consumer._generation)
    revoke = asyncio.create_task(h.consumer._revoked({TP}))
    await asyncio.sleep(0.05)
    assert not revoke.done()  # the batch's record is not acknowledged yet
    assert h.events == ["handled 5"]
    h.acks[0].set_result(None)
    await asyncio.wait_for(revoke, 1)
    assert h.events == ["handled 5", "after 5", "commit 6"]
    assert h.consumer.assigned == set()
    await h.consumer.close()


async def test_batches_finish_in_order_and_commits_cover_only_finished_ones() -> None:
    h = Harness()
    await h.consumer._handle({TP: [_record(1)]}, h.consumer._generation)
    await h.consumer._handle({TP: [_record(2)]}, h.consumer._generation)
    h.acks[1].set_result(None)  # the later batch is acknowledged first
    await asyncio.sleep(0.05)
    await h.consumer._commit()
    assert h.events == ["handled 1", "handled 2"]  # nothing finished, nothing committed
    h.acks[0].set_result(None)
    await h.consumer._finish_outstanding()
    await h.consumer._commit()
    assert h.events == ["handled 1", "handled 2", "after 1", "after 2", "commit 3"]
    await h.consumer.close()


async def test_a_failed_or_cancelled_acknowledgement_is_a_kafka_error() -> None:
    loop = asyncio.get_running_loop()
    done, failed, cancelled = (loop.create_future() for _ in range(3))
    done.set_result(None)
    failed.set_exception(KafkaError("broker gone"))
    cancelled.cancel()
    await _all_acknowledged([done])
    with pytest.raises(KafkaError, match="broker gone"):
        await _all_acknowledged([done, failed])
    with pytest.raises(KafkaError, match="cancelled"):
        await _all_acknowledged([cancelled])
    other = loop.create_future()
    other.set_exception(OSError("reset"))
    with pytest.raises(KafkaError, match="produce failed"):
        await _all_acknowledged([other])


def test_a_produce_timeout_is_transient_and_a_bug_is_not() -> None:
    assert is_transient(KafkaTimeoutError()) is True
    assert is_transient(RequestTimedOutError()) is True
    assert is_transient(ValueError("bug")) is False
    assert is_transient(StoreError("READONLY replica", retriable=True)) is True


class Partitions:
    """Stands in for the aiokafka consumer's fetching: ``getmany`` hands out the records of
    ``log`` from each partition's position, except for paused partitions (aiokafka's fetcher
    drops what it buffered for a paused partition and leaves its position); ``pause``,
    ``resume``, ``seek`` and ``commit`` are recorded in ``calls``."""

    def __init__(self, consumer: BatchConsumer, log: dict[TopicPartition, list[int]]) -> None:
        self.log = log
        self.position = dict.fromkeys(log, 0)
        self.paused: set[TopicPartition] = set()
        self.calls: list[str] = []
        client: Any = consumer.consumer
        client.pause, client.resume, client.seek = self.pause, self.resume, self.seek
        client.getmany, client.commit = self.getmany, self.commit

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)
        self.calls.append(f"pause {sorted(tp.partition for tp in tps)}")

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)
        self.calls.append(f"resume {sorted(tp.partition for tp in tps)}")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset
        self.calls.append(f"seek {tp.partition} {offset}")

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.calls.append(f"commit {[(tp.partition, m.offset) for tp, m in offsets.items()]}")

    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp, offsets in self.log.items():
            if tp in self.paused:
                continue
            ready = [o for o in offsets if o >= self.position[tp]][:max_records]
            if ready:
                fetched[tp] = [consumed(tp.topic, tp.partition, o, b"v") for o in ready]
                self.position[tp] = ready[-1] + 1
        if not fetched:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
        return fetched


async def test_an_assign_hook_failing_transiently_is_retried_before_the_partitions_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[set[TopicPartition]] = []

    async def restore(tps: set[TopicPartition]) -> None:
        calls.append(tps)
        if len(calls) == 1:
            raise StoreError("connection reset", retriable=True)

    async def no_wait(_: float) -> None:
        return None

    monkeypatch.setattr("streams.transport.asyncio.sleep", no_wait)
    consumer = BatchConsumer(Settings(), "test", [TP.topic], Harness().handle, on_assigned=restore)
    kafka = Partitions(consumer, {TP: []})

    await consumer._assigned({TP})
    assert consumer._hook_task is not None
    await asyncio.wait_for(consumer._hook_task, 1)

    assert calls == [{TP}, {TP}]
    assert consumer.assigned == {TP}
    assert kafka.calls == ["pause [0]", "resume [0]"]


async def test_periodic_commits_go_on_after_a_commit_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = Harness()
    attempts: list[int] = []

    async def flaky_commit() -> None:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise KafkaError("metadata too large")
        if len(attempts) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr(harness.consumer, "_commit", flaky_commit)
    with pytest.raises(asyncio.CancelledError):
        await harness.consumer._commit_every(0)

    assert attempts == [0, 1, 2]  # the first failure did not end the loop


async def test_prepare_runs_before_each_attempt_of_the_handler_and_its_transient_errors_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness()
    prepared: list[list[int]] = []

    async def prepare(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        prepared.append([r.offset for r in records])
        h.events.append("prepared")
        if len(prepared) == 1:
            raise StoreError("registry briefly unreachable", retriable=True)

    async def no_wait(_: float) -> None:
        return None

    monkeypatch.setattr("streams.transport.asyncio.sleep", no_wait)
    h.consumer.prepare = prepare
    await h.consumer._handle({TP: [_record(7), _record(8)]}, h.consumer._generation)

    assert prepared == [[7, 8], [7, 8]]
    assert h.events == ["prepared", "prepared", "handled 8"]


def _recording_seeks(h: Harness) -> list[tuple[TopicPartition, int]]:
    seeks: list[tuple[TopicPartition, int]] = []
    h.consumer.consumer.seek = lambda tp, offset: seeks.append((tp, offset))
    return seeks


async def test_a_batch_retrying_a_transient_error_is_given_up_when_its_partitions_are_revoked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("streams.transport.backoff_delay", lambda *_, **__: 5.0)
    h = Harness()
    seeks = _recording_seeks(h)
    tries: list[int] = []

    async def redis_down(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        tries.append(records[0].offset)
        raise StoreError("connection refused", retriable=True)

    h.consumer.handler = redis_down
    handling = asyncio.create_task(
        h.consumer._handle({TP: [_record(3), _record(4)]}, h.consumer._generation)
    )
    await asyncio.sleep(0.05)  # first try failed; now waiting 5 s to retry
    assert tries == [3]
    assert not handling.done()

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=0.3)  # not after the backoff

    assert handling.done()
    assert handling.exception() is None
    assert tries == [3]
    assert seeks == [(TP, 3)]  # its buffered records are dropped
    assert h.events == []  # nothing committed: the next owner replays offsets 3 and 4
    assert h.consumer.assigned == set()


async def test_a_batch_still_running_gets_the_grace_period_and_is_then_cancelled() -> None:
    h = Harness()
    seeks = _recording_seeks(h)
    h.consumer.abandon_after_s = 0.1
    cancelled = asyncio.Event()

    async def stuck(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        try:
            await asyncio.sleep(3600)  # e.g. waiting for a free LLM call slot
        except asyncio.CancelledError:
            cancelled.set()
            raise

    h.consumer.handler = stuck
    handling = asyncio.create_task(h.consumer._handle({TP: [_record(9)]}, h.consumer._generation))
    await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert 0.08 <= loop.time() - started < 1.0
    assert cancelled.is_set()
    assert handling.done()
    assert seeks == [(TP, 9)]
    assert h.events == []


async def test_a_batch_finishing_within_the_grace_period_is_kept_and_committed() -> None:
    h = Harness()
    seeks = _recording_seeks(h)
    h.consumer.abandon_after_s = 5
    release = asyncio.Event()
    inner = h.handle

    async def slow(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await release.wait()
        await inner(records)

    h.consumer.handler = slow
    handling = asyncio.create_task(
        h.consumer._handle({TP: [_record(5), _record(6)]}, h.consumer._generation)
    )
    await asyncio.sleep(0.02)
    revoke = asyncio.create_task(h.consumer._revoked({TP}))
    await asyncio.sleep(0.05)
    release.set()
    await handling
    h.acks[0].set_result(None)
    await asyncio.wait_for(revoke, timeout=2)

    assert seeks == []
    assert h.events == ["handled 6", "after 6", "commit 7"]


class _Exited(BaseException):
    """What the test's ``os._exit`` raises instead of ending the process."""


async def test_a_batch_that_ignores_its_cancellation_ends_the_worker_without_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits = _exits(monkeypatch)
    monkeypatch.setattr("streams.transport.CANCELLED_BATCH_WAIT_S", 0.2, raising=False)
    h = Harness()
    h.consumer.abandon_after_s = 0.05
    released = asyncio.Event()
    swallowed: list[int] = []

    async def stubborn(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        while not released.is_set():  # a retry loop that catches CancelledError: the bug
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                swallowed.append(records[0].offset)

    h.consumer.handler = stubborn
    handling = asyncio.create_task(h.consumer._handle({TP: [_record(9)]}, h.consumer._generation))
    await asyncio.sleep(0.02)
    revoke = asyncio.create_task(h.consumer._revoked({TP}))
    try:
        await asyncio.wait({handling}, timeout=2)
        assert swallowed == [9]  # it was cancelled once, after the grace period
        assert exits == [70]  # instead of waiting for it forever, holding the rebalance
        assert isinstance(handling.exception(), _Exited)
        assert h.events == []  # nothing committed: the restart replays offset 9
    finally:
        released.set()
        await asyncio.wait_for(revoke, timeout=2)
        await h.consumer.close()


def _blocked_hook(
    started: list[set[TopicPartition]], release: asyncio.Event, cancelled: asyncio.Event
) -> Any:
    """An ``on_assigned`` hook (a slow restore) that runs until ``release`` is set."""

    async def restore(tps: set[TopicPartition]) -> None:
        started.append(tps)
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return restore


async def test_the_assignment_callback_returns_while_a_slow_hook_runs() -> None:
    """aiokafka restarts the group's heartbeat only once the callback returned: a restore
    inside it longer than the session timeout got the member evicted."""
    h = Harness()
    h.consumer.assigned = set()  # as after the revoke that precedes every assignment
    started: list[set[TopicPartition]] = []
    release, cancelled = asyncio.Event(), asyncio.Event()
    h.consumer.on_assigned = _blocked_hook(started, release, cancelled)
    kafka = Partitions(h.consumer, {TP: [0, 1]})

    await asyncio.wait_for(h.consumer._assigned({TP}), timeout=0.5)

    await asyncio.sleep(0.05)
    assert started == [{TP}]  # the hook runs...
    assert kafka.paused == {TP}  # ...with its partition paused, and not usable yet
    assert h.consumer.assigned == set()
    release.set()
    await asyncio.sleep(0.05)
    assert h.consumer.assigned == {TP}
    assert kafka.calls == ["pause [0]", "resume [0]"]
    assert not cancelled.is_set()


async def _until(done: Any, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_records_are_handled_only_once_the_hook_is_done_and_none_is_lost() -> None:
    h = Harness()
    h.consumer.assigned = set()
    handled: list[int] = []
    inner = h.handle

    async def handle(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        handled.extend(r.offset for r in records)
        await inner(records)

    h.consumer.handler = handle
    release = asyncio.Event()

    async def restore(tps: set[TopicPartition]) -> None:
        await release.wait()
        h.events.append("restored")

    h.consumer.on_assigned = restore
    kafka = Partitions(h.consumer, {TP: [0, 1, 2]})
    run = asyncio.ensure_future(h.consumer.run())
    assign = asyncio.ensure_future(h.consumer._assigned({TP}))
    await asyncio.sleep(0.2)  # the stage fetches several times meanwhile

    assert assign.done()  # the callback returned long ago
    assert h.events == []
    assert kafka.position[TP] == 0  # nothing taken from the paused partition
    release.set()
    await _until(lambda: len(handled) == 3)
    for ack in h.acks:
        ack.set_result(None)
    h.consumer.stop_soon()
    await asyncio.wait_for(run, 2)

    assert handled == [0, 1, 2]  # each once, from the committed position, after the restore
    assert h.events == ["restored", "handled 2", "after 2"]
    assert kafka.calls == ["pause [0]", "resume [0]", "commit [(0, 3)]"]
    await h.consumer.close()


async def test_records_fetched_while_the_hook_runs_are_given_back() -> None:
    """aiokafka hands out nothing of a paused partition; were it to, the records must be
    fetched again after the hook, not handled before it, nor dropped with the position past
    them."""
    h = Harness()
    h.consumer.assigned = set()
    started: list[set[TopicPartition]] = []
    release, cancelled = asyncio.Event(), asyncio.Event()
    h.consumer.on_assigned = _blocked_hook(started, release, cancelled)
    kafka = Partitions(h.consumer, {TP: [4, 5]})
    kafka.position[TP] = 4
    assign = asyncio.ensure_future(h.consumer._assigned({TP}))
    await asyncio.sleep(0.02)
    kafka.paused.clear()  # a fetch completing despite the pause

    fetched = await h.consumer._fetch(0, 10)

    assert fetched == {}
    assert kafka.position[TP] == 4
    assert kafka.calls == ["pause [0]", "seek 0 4"]
    release.set()
    await asyncio.wait_for(assign, 1)
    await _until(lambda: h.consumer.assigned == {TP})
    assert await h.consumer._fetch(0, 10) == {TP: [_record(4), _record(5)]}


async def test_a_revoke_cancels_a_hook_still_running_and_waits_for_it_to_end() -> None:
    h = Harness()
    h.consumer.assigned = set()
    started: list[set[TopicPartition]] = []
    release, cancelled = asyncio.Event(), asyncio.Event()
    h.consumer.on_assigned = _blocked_hook(started, release, cancelled)
    kafka = Partitions(h.consumer, {TP: [0]})
    assign = asyncio.ensure_future(h.consumer._assigned({TP}))
    await asyncio.sleep(0.02)
    assert started == [{TP}]

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=1)

    assert cancelled.is_set()  # the hook ended before the revoke returned
    assert h.consumer._hook_task is None
    assert assign.done()
    release.set()
    await asyncio.sleep(0.02)
    assert h.consumer.assigned == set()  # never usable
    assert kafka.calls == ["pause [0]"]  # not resumed, nothing committed
    assert h.events == []


def _exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record ``os._exit`` calls (raising ``_Exited``) instead of ending the process."""
    exits: list[int] = []

    def exit_(status: int) -> None:
        exits.append(status)
        raise _Exited

    monkeypatch.setattr("streams.transport.os._exit", exit_)
    monkeypatch.setattr("streams.transport.logging.shutdown", lambda: None)
    return exits


async def test_a_revoke_whose_earlier_batch_never_finishes_exits_without_commit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exits = _exits(monkeypatch)
    h = Harness()
    h.consumer.abandon_after_s = 0.05
    h.consumer.finish_after_s = 0.1
    await h.consumer._handle(
        {TP: [_record(4)]}, h.consumer._generation
    )  # its acknowledgement never comes
    started = time.monotonic()

    with pytest.raises(_Exited):
        await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert 0.09 <= time.monotonic() - started < 1.0
    assert exits == [70]
    assert h.events == ["handled 4"]  # no after-action (changelog write), no commit
    assert "still not finished" in caplog.text
    h.acks[0].set_result(None)
    await h.consumer.close()


async def test_the_batch_in_progress_and_the_earlier_ones_share_one_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both limits run from the start of the revoke, so together they take finish_after_s,
    not abandon_after_s more: the earlier batch had the time the batch in progress took."""
    exits = _exits(monkeypatch)
    h = Harness()
    h.consumer.abandon_after_s = 0.2
    h.consumer.finish_after_s = 0.3
    await h.consumer._handle({TP: [_record(1)]}, h.consumer._generation)  # never acknowledged
    inner = h.handle

    async def slow(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await asyncio.sleep(0.15)  # finishes within its grace
        await inner(records)

    h.consumer.handler = slow
    handling = asyncio.ensure_future(h.consumer._handle({TP: [_record(2)]}, h.consumer._generation))
    await asyncio.sleep(0.01)
    started = time.monotonic()

    with pytest.raises(_Exited):
        await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert 0.28 <= time.monotonic() - started < 0.45
    assert exits == [70]
    assert handling.done()
    assert h.events == ["handled 1", "handled 2"]
    for ack in h.acks:
        ack.set_result(None)
    await h.consumer.close()


async def test_a_batch_returning_just_inside_its_grace_has_time_for_its_acknowledgements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its acknowledgements and changelog writes come after it returned: a finish deadline
    equal to the grace time would end the worker for a batch that did nothing wrong."""
    exits = _exits(monkeypatch)
    h = Harness()
    h.consumer.abandon_after_s = 0.1
    h.consumer.finish_after_s = 0.4
    inner = h.handle

    async def slow(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await asyncio.sleep(0.09)  # returns just inside its grace
        await inner(records)
        asyncio.get_running_loop().call_later(0.1, h.acks[-1].set_result, None)

    h.consumer.handler = slow
    handling = asyncio.ensure_future(h.consumer._handle({TP: [_record(5)]}, h.consumer._generation))
    await asyncio.sleep(0.005)

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert exits == []
    assert handling.done()
    assert h.events == ["handled 5", "after 5", "commit 6"]
    assert h.consumer.assigned == set()
    await h.consumer.close()


async def test_a_commit_failing_at_a_revoke_still_gives_the_partitions_up() -> None:
    """A commit error other than a timeout (aiokafka swallows what the callback raises) left
    the partitions in ``assigned``: the next assignment then found nothing new to pause and
    handled batches while the restore ran."""
    h = Harness()
    h.consumer.abandon_after_s = h.consumer.finish_after_s = 0.1

    async def failing_commit(offsets: dict[TopicPartition, Any]) -> None:
        h.events.append("commit sent")
        raise KafkaError("UnknownError")

    h.consumer.consumer.commit = failing_commit  # type: ignore[method-assign]
    await h.consumer._handle({TP: [_record(3)]}, h.consumer._generation)
    h.acks[0].set_result(None)

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert h.events == ["handled 3", "after 3", "commit sent"]
    assert h.consumer.assigned == set()
    assert h.consumer._finished == {}  # no stale offset committed later
    started: list[set[TopicPartition]] = []
    release, cancelled = asyncio.Event(), asyncio.Event()
    h.consumer.on_assigned = _blocked_hook(started, release, cancelled)
    kafka = Partitions(h.consumer, {TP: [3]})
    await h.consumer._assigned({TP})
    assert kafka.paused == {TP}  # paused until the hook is done, not usable meanwhile
    assert h.consumer.assigned == set()
    release.set()
    await asyncio.sleep(0.05)
    assert h.consumer.assigned == {TP}
    await h.consumer.close()


async def test_a_hook_ending_with_an_error_guard_batch_passes_on_ends_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits = _exits(monkeypatch)
    h = Harness()
    h.consumer.assigned = set()

    async def hook(tps: set[TopicPartition]) -> None:
        raise BatchAbandoned("given up")  # a BaseException path guard_batch lets through

    h.consumer.on_assigned = hook
    kafka = Partitions(h.consumer, {TP: []})
    await h.consumer._assigned({TP})
    await asyncio.sleep(0.05)  # the task's done callback runs

    assert exits == [70]
    assert kafka.paused == {TP}


async def test_no_hook_starts_once_the_consumer_is_closing() -> None:
    h = Harness()
    started: list[set[TopicPartition]] = []
    release, cancelled = asyncio.Event(), asyncio.Event()
    h.consumer.on_assigned = _blocked_hook(started, release, cancelled)
    kafka = Partitions(h.consumer, {TP: []})
    h.consumer._closing = True  # as during close(): a rejoin completing meanwhile

    await h.consumer._assigned({TP})
    await asyncio.sleep(0.02)

    assert started == []
    assert h.consumer._hook_task is None
    assert kafka.paused == {TP}


async def test_a_commit_hanging_at_a_revoke_is_given_up_within_the_limit() -> None:
    h = Harness()
    h.consumer.abandon_after_s = h.consumer.finish_after_s = 0.1
    h.consumer.revoke_commit_s = 0.1
    never = asyncio.Event()

    async def hanging_commit(offsets: dict[TopicPartition, Any]) -> None:
        h.events.append("commit sent")
        await never.wait()  # a broker answering with retriable errors, forever

    h.consumer.consumer.commit = hanging_commit  # type: ignore[method-assign]
    await h.consumer._handle({TP: [_record(3)]}, h.consumer._generation)
    h.acks[0].set_result(None)
    started = time.monotonic()

    await asyncio.wait_for(h.consumer._revoked({TP}), timeout=2)

    assert time.monotonic() - started < 0.5
    assert h.events == ["handled 3", "after 3", "commit sent"]
    assert h.consumer.assigned == set()  # given up: the next owner replays offset 3
    await h.consumer.close()


async def test_a_batch_fetched_before_a_revoke_is_not_handled_when_its_partition_returns() -> None:
    """Its partition comes back at the committed offset, from where the records are fetched
    and handled again; handled now as well, they would be handled twice."""
    h = Harness()
    Partitions(h.consumer, {TP: [7]})
    fetched = await h.consumer._fetch(0, 10)
    fetched_in = h.consumer._fetched_in
    await h.consumer._revoked({TP})
    await h.consumer._assigned({TP})  # no hook: usable at once

    await h.consumer._handle(fetched, fetched_in)

    assert h.events == []
    await h.consumer._handle({TP: [_record(7)]}, h.consumer._generation)  # fetched now
    assert h.events == ["handled 7"]
    await h.consumer.close()
