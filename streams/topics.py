"""Creating the pipeline's topics explicitly, with their partition counts, before any client asks.

Some brokers auto-create a topic with a default partition count when a client merely asks for
its metadata; creating every topic (and the table changelogs) up front keeps
the co-partitioning the stages rely on, on any broker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from streams.settings import Settings
from streams.transport import MAX_REQUEST_SIZE

__all__ = [
    "TABLE_NAMES",
    "TopicLayoutError",
    "create_topics",
    "internal_topics",
    "topic_table",
]

log = logging.getLogger(__name__)

TABLE_NAMES = ("conversations",)
"""Tables of the app (``streams.table``); changelog topics ``<app_id>-<table>-changelog``."""

_TOPIC_DOCS = {
    "inbound": ("tenant/conversation key", "InboundMessage (Avro or JSON)", "what users publish"),
    "conversations": ("conversation_id", "ConversationEvent", "routed chat turns and commands"),
    "llm_requests": ("conversation_id", "LLMRequest", "turns to answer (one per conversation)"),
    "llm_responses": ("conversation_id", "LLMResponse", "answers, back to the conversation"),
    "delivery_requests": ("recipient", "DeliveryRequest", "replies and notifications to send"),
    "delivery_reports": ("message_id", "DeliveryReport", "outcome of every delivery"),
    "deadletter": ("original key", "DeadLetter", "records that could not be processed"),
    "handoff": ("conversation_id", "ConversationEvent", "turns escalated to a human agent"),
    "analytics": ("conversation_id", "ConversationSummary", "analytics of each ended session"),
}


class TopicLayoutError(RuntimeError):
    """An existing topic has a partition count the pipeline cannot work with."""


def topic_table(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(topic, key, schema, purpose) rows for the README and ``switchboard topics``."""
    topics = settings.topics
    return [(getattr(topics, attr), *doc) for attr, doc in _TOPIC_DOCS.items()]


def internal_topics(settings: Settings) -> list[tuple[str, int]]:
    """The app's own topics: table changelogs (same partitions as the sources)."""
    return [(f"{settings.app_id}-{name}-changelog", settings.partitions) for name in TABLE_NAMES]


def _check_partitions(described: list[Any], wanted: list[tuple[str, int]]) -> None:
    """Fail when an existing topic's partition count differs from the one wanted.

    The conversation agent's inputs and its changelog must be co-partitioned (records of one
    conversation in the same partition number everywhere); a topic created elsewhere with
    another count would silently break that.
    """
    counts = {d["topic"]: len(d.get("partitions") or []) for d in described}
    wrong = [
        f"{name} has {counts[name]} partitions, expected {partitions}"
        for name, partitions in wanted
        if counts.get(name) not in (None, 0, partitions)
    ]
    if wrong:
        raise TopicLayoutError(
            "existing topics do not match SWITCHBOARD_PARTITIONS: "
            + "; ".join(wrong)
            + " (create them with the same count, or set SWITCHBOARD_PARTITIONS to match)"
        )


def _created(response: Any, name: str) -> bool:
    """Whether a CreateTopics response says ``name`` was created (False: it already existed).

    aiokafka returns the response without raising its per-topic error codes.

    Raises:
        TopicLayoutError: the broker refused the topic (e.g. a topic policy rejecting its
            configs), which would otherwise leave it to be auto-created without them.
    """
    for entry in getattr(response, "topic_errors", ()):
        topic, code = entry[0], entry[1]
        if topic != name or code == 0:
            continue
        if code == TopicAlreadyExistsError.errno:
            return False
        message = entry[2] if len(entry) > 2 and entry[2] else ""
        error = for_code(code).__name__
        raise TopicLayoutError(f"the broker refused to create topic {name}: {error} {message}")
    return True


async def create_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create every topic that does not exist yet; return the names created.

    Raises:
        KafkaConnectionError: the brokers could not be reached within ``timeout_s`` seconds.
        TopicLayoutError: the broker refused a topic, or an existing topic has too few
            partitions.
    """
    wanted = [(name, settings.partitions) for name in settings.topics.all()]
    wanted += internal_topics(settings)
    changelogs = {f"{settings.app_id}-{name}-changelog" for name in TABLE_NAMES}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.broker_list(), request_timeout_ms=int(timeout_s * 1000)
    )
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        for name, partitions in wanted:
            if name in existing:
                continue
            # Records up to the producer's limit must fit every topic (Kafka's default
            # max.message.bytes is ~1 MiB): a dead letter wraps a whole input record.
            configs = {"max.message.bytes": str(MAX_REQUEST_SIZE)}
            if name in changelogs:
                configs["cleanup.policy"] = "compact"
            try:
                response = await admin.create_topics(
                    [NewTopic(name, partitions, 1, topic_configs=configs)]
                )
            except TopicAlreadyExistsError:
                continue
            if _created(response, name):
                created.append(name)
        _check_partitions(await admin.describe_topics([n for n, _ in wanted]), wanted)
    finally:
        await admin.close()
    log.info("created %d topic(s): %s", len(created), ", ".join(created) or "-")
    return created
