"""Building the Faust app: settings, topics (raw bytes; our codec does Avro), table, agents."""

from __future__ import annotations

import logging
from typing import Any

import faust

from processors.config import SwitchboardConfig
from streams.agents import conversation, delivery, ingest, llm
from streams.runtime import Runtime
from streams.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

DRAIN_S = 10.0
"""How long a stopping worker waits for its LLM calls in flight (s)."""


def _faust_settings(settings: Settings) -> dict[str, Any]:
    session_s = settings.session_timeout_s
    options: dict[str, Any] = {
        "broker": [f"kafka://{b}" for b in settings.broker_list()],
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_partitions": settings.partitions,
        "topic_replication_factor": 1,
        "broker_session_timeout": session_s,
        "broker_heartbeat_interval": max(0.5, session_s / 6),
        "broker_rebalance_timeout": max(session_s * 2, 10.0),
        "broker_commit_interval": 1.0,
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": 8 * 1024 * 1024,
        "producer_max_request_size": 8 * 1024 * 1024,
        "web_enabled": False,
        "store": "memory://",
        "datadir": str(settings.data_dir / "faust" / settings.app_id),
        "table_standby_replicas": 0,
        "producer_acks": -1,
    }
    if settings.single_record_batches:
        options["producer_max_batch_size"] = 1
        options["producer_linger"] = 0.0
    return options


def _limit_fetch_wait(max_wait_ms: int) -> None:
    """Make Faust's worker consumers wait at most ``max_wait_ms`` per fetch.

    Faust 0.15 hard-codes ``fetch_max_wait_ms=1500`` for its worker consumer; on a broker that
    does not complete a waiting fetch when new data arrives, every topic hop then costs up to
    1.5 s. aiokafka reads the value when the consumer starts, so setting it on the freshly
    built consumer is enough.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    thread_cls: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_cls, "_switchboard_original_create", None)
    if original is None:
        original = thread_cls._create_worker_consumer
        thread_cls._switchboard_original_create = original

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms
        return consumer

    thread_cls._create_worker_consumer = create


def create_app(settings: Settings, config: SwitchboardConfig) -> tuple[Any, Runtime]:
    """Create the Faust app with every agent registered, and the Runtime they share.

    Returns:
        ``(app, runtime)``; run the app with ``faust.Worker(app).execute_from_commandline()``.
    """
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    if settings.fetch_max_wait_ms is not None:
        _limit_fetch_wait(settings.fetch_max_wait_ms)
    app = faust.App(settings.app_id, **_faust_settings(settings))
    rt = Runtime(settings, config)
    names = settings.topics

    def topic(*topic_names: str) -> Any:
        return app.topic(
            *topic_names,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    topics: dict[str, Any] = {
        "inbound": topic(names.inbound),
        "conversations": topic(names.conversations),
        "llm_requests": topic(names.llm_requests),
        "llm_responses": topic(names.llm_responses),
        "conversation_inputs": topic(names.conversations, names.llm_responses),
        "delivery_requests": topic(names.delivery_requests),
        "delivery_reports": topic(names.delivery_reports),
        "deadletter": topic(names.deadletter),
        "handoff": topic(names.handoff),
        "analytics": topic(names.analytics),
    }
    table = app.Table(
        "conversations",
        default=None,
        partitions=settings.partitions,
        # Raw bytes both ways: the agent stores ConversationState as JSON it encodes itself.
        # Faust derives the changelog serializers from key_type/value_type (bytes -> raw,
        # anything else -> json); a Schema alone made recovery JSON-decode raw keys.
        key_type=bytes,
        value_type=bytes,
        # The changelog partition is chosen from the key by the producer's partitioner, the
        # same murmur2 partitioning as the conversation_id-keyed input topics, so state can be
        # written after a batch (outside a single event's context) and still land in the
        # partition that is recovered together with its inputs.
        use_partitioner=True,
        help="Conversation state (processors.conversation.ConversationState) by conversation_id.",
    )
    ingest.register(app, rt, topics)
    conversation.register(app, rt, topics, table)
    llm.register(app, rt, topics)
    delivery.register(app, rt, topics)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types receivers narrowly
    async def _close_runtime(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Sent after the consumer stopped and before the producer's final flush.
        left = await rt.drain(DRAIN_S)
        if left:
            log.warning("%d LLM call(s) still in flight at shutdown; they will be re-issued", left)
        await rt.aclose()

    return app, rt
