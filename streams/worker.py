"""One worker process: the four stages, each a consumer group member, sharing one producer.

Start-up: Redis and the schema registry (``Runtime.start``), the producer, then the stages'
consumers (ingest, conversation, llm, delivery) and the conversation timer. Shutdown (SIGTERM
or SIGINT): every stage finishes and commits the batch in progress and stops reading; the LLM
calls in flight get ``DRAIN_S`` seconds to finish and send their responses; the producer
flushes; the consumers leave their groups. A stage that dies takes the worker down (exit 1) so
that its supervisor restarts it rather than leaving a partition unserved.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from functools import partial
from typing import Any

from processors.config import SwitchboardConfig
from streams.agents import conversation, delivery, ingest, llm
from streams.agents.common import RawMessage, dead_letter_unreadable
from streams.runtime import Runtime
from streams.settings import Settings
from streams.topics import internal_topics, record_limits
from streams.transport import BatchConsumer, Producer

__all__ = ["DRAIN_S", "run_worker", "topic_names"]

log = logging.getLogger(__name__)

DRAIN_S = 10.0
"""How long a stopping worker waits for its LLM calls in flight (s)."""
STOP_S = 30.0
"""How long a stopping worker waits for its stages to finish their batches (s); a stage still
running then is cancelled, and the worker exits with status 1."""


async def _resolve_writer_schemas(rt: Runtime, records: Sequence[RawMessage]) -> None:
    """Fetch the writer schemas a batch needs (``Codec.resolve_unknown``)."""
    await rt.codec.resolve_unknown(
        record.value if isinstance(record.value, bytes) else None for record in records
    )


def topic_names(settings: Settings) -> dict[str, str]:
    """The stages' topics by role."""
    names = settings.topics
    return {
        "inbound": names.inbound,
        "conversations": names.conversations,
        "llm_requests": names.llm_requests,
        "llm_responses": names.llm_responses,
        "delivery_requests": names.delivery_requests,
        "delivery_reports": names.delivery_reports,
        "deadletter": names.deadletter,
        "handoff": names.handoff,
        "analytics": names.analytics,
    }


async def run_worker(settings: Settings, config: SwitchboardConfig) -> int:
    """Run the stages until SIGTERM/SIGINT; return the process exit status (0 after a clean
    stop, 1 when a stage failed, or failed or did not finish within ``STOP_S`` while stopping).

    Raises:
        KafkaConnectionError: the brokers could not be reached at start-up.
        ConnectorError: Redis could not be reached at start-up.
    """
    rt = Runtime(settings, config)
    produced = [t for t in settings.topics.all() if t != settings.topics.inbound]
    produced += [name for name, _ in internal_topics(settings)]  # the changelogs
    limits = await record_limits(settings, produced)
    producer = Producer(settings, record_limits=limits)
    for topic, limit in sorted(producer.record_limits.items()):
        log.warning(
            "%s takes records of at most %d bytes (max.message.bytes): larger records are "
            "refused before they are sent, conversation states trimmed to fit, and every "
            "batch, on every topic, kept within it",
            topic,
            limit,
        )
    await producer.start()
    rt.kafka = producer
    await rt.start()
    topics = topic_names(settings)
    conversation_consumer, ticks = conversation.stage(rt, topics)
    stages: list[BatchConsumer] = [
        ingest.stage(rt, topics),
        conversation_consumer,
        llm.stage(rt, topics),
        delivery.stage(rt, topics),
    ]
    if settings.schema_registry_url is not None:
        for consumer in stages:
            consumer.prepare = partial(_resolve_writer_schemas, rt)
    for consumer in stages:
        consumer.on_unreadable = partial(
            dead_letter_unreadable, rt, topics["deadletter"], consumer.stage
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for consumer in stages:
        await consumer.start()
    runs: dict[asyncio.Task[Any], str] = {
        asyncio.create_task(consumer.run(), name=consumer.stage): consumer.stage
        for consumer in stages
    }
    timer = asyncio.create_task(ticks(), name="conversation.timer")
    runs[timer] = "conversation.timer"
    failed = asyncio.create_task(rt.failed.wait(), name="runtime.failed")
    runs[failed] = "llm"  # the one stage that sends outside its batches (Runtime.fail)
    log.info("worker started: stages %s", ", ".join(c.stage for c in stages))
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopped, *runs}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    for task in done:
        if task is not stopped:
            status = 1
            exc = task.exception() if not task.cancelled() else None
            if task is failed:
                exc = rt.failure
            log.critical("stage %s stopped: %r", runs[task], exc, exc_info=exc)
    log.info("worker stopping")
    for consumer in stages:
        consumer.stop_soon()
    timer.cancel()
    failed.cancel()
    _, stuck = await asyncio.wait(list(runs), timeout=STOP_S)
    for task in stuck:  # e.g. a batch still retrying a transient error: not committed
        status = 1
        log.error("stage %s did not stop within %.0f s; its batch is replayed", runs[task], STOP_S)
        task.cancel()
    for task in runs:
        if task.done() and not task.cancelled() and task not in done and task.exception():
            status = 1
            log.error("stage %s failed while stopping: %r", runs[task], task.exception())
    left = await rt.drain(DRAIN_S)
    if left:
        log.warning(
            "%d LLM call(s) still in flight or waiting at shutdown; they will be re-issued "
            "after conversation.llm_deadline_s",
            left,
        )
    await producer.flush()
    for consumer in stages:
        await consumer.close()
    await producer.stop()
    await rt.aclose()
    stopped.cancel()
    log.info("worker stopped")
    return status
