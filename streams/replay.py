"""``switchboard replay``: publish InboundMessage records and account for every one of them.

Each record ends as a delivery report (delivered or failed) or a dead letter; the replay
listens on both topics from before its first send, matches outcomes to the ids it published,
and reports what is still unaccounted when the timeout passes.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from processors.ids import new_message_id
from processors.preprocess import conversation_id_for
from schemas.codec import Codec
from schemas.errors import DecodeError
from schemas.models import DeadLetter, DeliveryReport, DeliveryStatus, InboundMessage, utcnow
from schemas.schema_registry_client import SchemaRegistryClient
from streams.settings import Settings
from streams.transport import DEFAULT_FETCH_MAX_WAIT_MS

__all__ = ["Outcome", "ReplayResult", "assign_from_end", "load_jsonl", "prepare", "replay"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one published message."""

    message: InboundMessage
    report: DeliveryReport | None = None
    dead_letter: DeadLetter | None = None

    @property
    def accounted(self) -> bool:
        """True once a report or a dead letter arrived."""
        return self.report is not None or self.dead_letter is not None


@dataclass
class ReplayResult:
    """Outcomes by message id, local input errors, and timings."""

    outcomes: dict[str, Outcome]
    invalid_lines: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def orders(self, outbox: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(published, delivered): this replay's message ids per conversation in the order
        they were published, and in the order an outbox file recorded their deliveries.

        Equal dicts mean every message was delivered exactly once and in order per
        conversation (duplicates and gaps show up as differences).
        """
        published: dict[str, list[str]] = defaultdict(list)
        for message_id, outcome in self.outcomes.items():
            published[outcome.message.conversation_id or ""].append(message_id)
        delivered: dict[str, list[str]] = defaultdict(list)
        with outbox.open(encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                if entry["message_id"] in self.outcomes:
                    delivered[entry["conversation_id"]].append(entry["message_id"])
        return dict(published), dict(delivered)

    def summary(self) -> dict[str, Any]:
        """The one-line JSON summary: counts and p50/p95 end-to-end latency in ms."""
        delivered = [o for o in self.outcomes.values() if o.report and _ok(o.report)]
        failed = [o for o in self.outcomes.values() if o.report and not _ok(o.report)]
        dead = [o for o in self.outcomes.values() if o.report is None and o.dead_letter]
        latencies = sorted(o.report.latency_ms for o in delivered if o.report)
        n = len(self.outcomes)
        return {
            "records_in": n,
            "replies_delivered": len(delivered),
            "delivery_failed": len(failed),
            "dead_lettered": len(dead) + len(failed),
            "unaccounted": sum(1 for o in self.outcomes.values() if not o.accounted),
            "invalid_lines": len(self.invalid_lines),
            "latency_p50_ms": round(_percentile(latencies, 50), 1),
            "latency_p95_ms": round(_percentile(latencies, 95), 1),
            "elapsed_s": round(self.elapsed_s, 2),
            "throughput_msg_s": round(n / self.elapsed_s, 1) if self.elapsed_s else 0.0,
        }


def _ok(report: DeliveryReport) -> bool:
    return report.status == DeliveryStatus.DELIVERED


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.4999))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def load_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read one JSON object per line; return (objects, errors naming the line)."""
    objects: list[dict[str, Any]] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(value, dict):
                errors.append(
                    f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}"
                )
                continue
            objects.append(value)
    return objects, errors


def prepare(raw: dict[str, Any], *, keep_ids: bool = False) -> InboundMessage:
    """An InboundMessage from a replay line: a fresh sortable id and created_at = now.

    The line's own ``message_id`` is kept only with ``keep_ids`` (otherwise a second replay of
    the same file would be dropped as duplicates); it is recorded in metadata
    ``replay.source_id``.

    Raises:
        pydantic.ValidationError: the line does not match the InboundMessage contract.
    """
    now = utcnow()
    data = dict(raw)
    source_id = data.get("message_id")
    if not keep_ids or not source_id:
        data["message_id"] = new_message_id(now)
        if source_id:
            data["metadata"] = {**data.get("metadata", {}), "replay.source_id": str(source_id)}
    data["created_at"] = now
    return InboundMessage.model_validate(data)


async def assign_from_end(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> None:
    """Assign every partition of ``topics`` to ``consumer`` at the current end, with the
    positions resolved now, so that everything published afterwards is read.

    On a broker whose ListOffsets answers too low (Tansu) a few older records are read too;
    callers match records by id, so that is harmless.
    """
    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()  # no public wait-for-metadata
            parts = consumer.partitions_for_topic(topic) or set()
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:  # resolve positions now, before anything is published
        await consumer.position(tp)


async def replay(
    settings: Settings,
    lines: Sequence[dict[str, Any]],
    *,
    timeout_s: float = 120.0,
    keep_ids: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Publish ``lines`` to the inbound topic and wait until each is accounted for.

    Args:
        settings: Brokers, topic prefix and schema registry of the running stack.
        lines: InboundMessage objects as JSON-like dicts (see ``prepare``).
        timeout_s: Give up waiting this many seconds after the last send.
        keep_ids: Keep the lines' message ids (see ``prepare``).
        on_progress: Called with (accounted, total) whenever an outcome arrives.
    """
    topics = settings.topics
    registry = (
        SchemaRegistryClient(settings.schema_registry_url) if settings.schema_registry_url else None
    )
    codec = Codec(registry)
    await codec.start()
    invalid: list[str] = []
    messages: list[InboundMessage] = []
    for index, raw in enumerate(lines, 1):
        try:
            messages.append(prepare(raw, keep_ids=keep_ids))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            invalid.append(f"record {index}: {problems}")
    outcomes = {m.message_id: Outcome(m) for m in messages}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker_list(),
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=settings.fetch_max_wait_ms or DEFAULT_FETCH_MAX_WAIT_MS,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker_list(),
        linger_ms=5,
        acks="all",
        max_request_size=4 * 1024 * 1024,
    )
    started = time.monotonic()
    try:
        await consumer.start()
        await producer.start()
        await assign_from_end(consumer, [topics.delivery_reports, topics.deadletter])
        for index, msg in enumerate(messages):
            msg = msg.model_copy(update={"created_at": utcnow()})  # latency starts at the send
            messages[index] = outcomes[msg.message_id].message = msg
            key = f"{msg.tenant}/{conversation_id_for(msg)}".encode()
            await producer.send(topics.inbound, codec.encode(msg), key=key)
        await producer.flush()
        accounted = 0
        deadline = time.monotonic() + timeout_s
        while accounted < len(outcomes) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    accounted += _account(codec, record.topic, record.value, topics, outcomes)
            if on_progress is not None:
                on_progress(accounted, len(outcomes))
    finally:
        await producer.stop()
        await consumer.stop()
        await codec.aclose()
    return ReplayResult(outcomes, invalid, time.monotonic() - started)


def _account(
    codec: Codec, topic: str, value: bytes | None, topics: Any, outcomes: dict[str, Outcome]
) -> int:
    """Attach one report/dead letter to its outcome; 1 if that newly accounts for a message."""
    try:
        if topic == topics.delivery_reports:
            report = codec.decode(value or b"", DeliveryReport)
            outcome = outcomes.get(report.message_id)
            if outcome is None or outcome.report is not None:
                return 0
            was = outcome.accounted
            outcome.report = report
            return 0 if was else 1
        dead = codec.decode(value or b"", DeadLetter)
    except DecodeError:
        log.warning("could not decode a record on %s", topic)
        return 0
    outcome = outcomes.get(dead.message_id or "")
    if outcome is None or outcome.accounted:
        return 0
    outcome.dead_letter = dead
    return 1
