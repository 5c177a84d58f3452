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
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from streams.settings import Settings
from streams.transport import MAX_REQUEST_SIZE

__all__ = [
    "TABLE_NAMES",
    "TopicLayoutError",
    "create_topics",
    "internal_topics",
    "record_limits",
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


def _limits_in(responses: list[Any]) -> dict[str, int]:
    """``max.message.bytes`` per topic from DescribeConfigs responses (resources whose error
    code is not 0, or that do not report the setting, are left out)."""
    limits: dict[str, int] = {}
    for response in responses:
        for resource in getattr(response, "resources", ()):
            code, name, entries = resource[0], resource[3], resource[4]
            if code != 0:
                log.warning(
                    "cannot read the max.message.bytes of %s (%s: %s); records up to %d bytes "
                    "are sent to it",
                    name,
                    for_code(code).__name__,
                    resource[1] or "",
                    MAX_REQUEST_SIZE,
                )
                continue
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    try:
                        limits[name] = int(entry[1])
                    except ValueError:
                        log.warning("%s: max.message.bytes %r is not a number", name, entry[1])
    return limits


async def record_limits(
    settings: Settings, names: list[str], *, timeout_s: float = 10.0
) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` (bytes): the largest record batch the broker takes
    on it (Kafka topic config; DescribeConfigs, KIP-133).

    A topic created elsewhere (a platform team's, with the broker's default of about 1 MiB)
    may take less than the producer's ``max_request_size``; the worker then sizes its states,
    dead letters and batches for that topic to fit (``streams.transport.Producer``) instead of
    having the broker refuse them. Apache Kafka reports every topic's effective value; a broker
    that reports only values set explicitly (Tansu) leaves the others out, as does one that
    cannot describe configs at all (logged).

    Returns:
        topic → bytes, for the topics whose limit the broker reported.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.broker_list(), request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    except Exception as exc:  # UnsupportedVersion, timeouts, ...: run with the default
        log.warning(
            "cannot read the topics' max.message.bytes (%s: %s); records up to %d bytes are "
            "sent, and the broker refuses those its topics do not take",
            type(exc).__name__,
            exc,
            MAX_REQUEST_SIZE,
        )
        return {}
    finally:
        await admin.close()
    return _limits_in(list(responses))


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
