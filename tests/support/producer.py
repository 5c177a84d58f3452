"""A producer double for stage tests: takes records like ``streams.transport.Producer``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError

from streams.transport import MAX_REQUEST_SIZE, record_bytes, track_acknowledgement


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    size: int


@dataclass
class RecordingProducer:
    """Takes records like aiokafka's ``send()``: ``MessageSizeTooLargeError`` above
    ``max_request_size`` (``streams.transport.record_bytes``), else a
    delivery future counted in the batch being handled (its result has ``topic``,
    ``partition`` and ``offset``, the record's index in ``sent``). ``raises``: errors
    ``send()`` raises in turn before taking a record; ``refusals``: errors the
    acknowledgements of the records taken fail with in turn (None for an acknowledged
    record). ``record_limits``: topics taking records only up to a lower size (bytes), as
    ``Producer`` gets them from the topics' ``max.message.bytes``."""

    max_request_size: int = MAX_REQUEST_SIZE
    record_limits: dict[str, int] = field(default_factory=dict)
    raises: list[Exception] = field(default_factory=list)
    refusals: list[Exception | None] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def limit(self, topic: str) -> int:
        """As ``Producer.limit``: the topic's lower limit, else ``max_request_size``."""
        return self.record_limits.get(topic, self.max_request_size)

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        headers = list(headers or ())
        size = record_bytes(key, value, headers)
        if self.raises:
            raise self.raises.pop(0)
        if size > self.limit(topic):
            raise MessageSizeTooLargeError(f"{size} bytes > {self.limit(topic)}")
        self.sent.append(Sent(topic, value, key, headers, size))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refusal = self.refusals.pop(0) if self.refusals else None
        if refusal is None:  # like aiokafka's RecordMetadata: where the record went
            ack.set_result(
                SimpleNamespace(topic=topic, partition=partition, offset=len(self.sent) - 1)
            )
        else:
            ack.set_exception(refusal)
        track_acknowledgement(ack)
        return ack
