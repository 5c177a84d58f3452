"""aiokafka's real fetcher buffer without a broker: tests serve record batches into it.

``AIOKafkaConsumer.getmany``, the subscription state and ``Fetcher.fetched_records`` run as
they do against a broker; only the background fetch task is replaced by a ``serve`` callback,
called before each ``getmany``, that puts into ``fetcher._records`` what a fetch would return.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder

__all__ = ["install_fetcher", "record_batch", "remove_fetcher"]


def record_batch(
    values: tuple[bytes, ...], headers: Callable[[int], list[tuple[str, bytes]]] | None = None
) -> bytearray:
    """A v2 record batch of ``values`` (key ``b"k"``, timestamp 0) at base offset 0;
    ``headers(delta)`` gives the headers of the record at ``delta``. The base offset (bytes
    0-7) is not covered by the CRC, so callers may write another one in."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for delta, value in enumerate(values):
        builder.append(
            delta, timestamp=0, key=b"k", value=value, headers=headers(delta) if headers else []
        )
    return bytearray(builder.build())


def install_fetcher(
    consumer: Any, serve: Callable[[], None], *, max_wait_ms: int | None = None
) -> None:
    """Give ``consumer`` (an ``AIOKafkaConsumer`` never started, its partitions assigned) a
    fetcher with no client and no fetch task, and make its ``getmany`` call ``serve()`` first.

    Args:
        consumer: The consumer.
        serve: Buffers what a fetch from each partition's position returns.
        max_wait_ms: When set, the longest a ``getmany`` waits (ms), whatever it is asked.
    """
    fetcher = Fetcher.__new__(Fetcher)
    fetcher._subscriptions = consumer._subscription
    fetcher._records = collections.OrderedDict()
    fetcher._wait_consume_future = None
    fetcher._fetch_waiters = set()
    fetcher._loop = asyncio.get_running_loop()
    fetcher._closed = False
    consumer._fetcher = fetcher
    consumer._coordinator = SimpleNamespace(check_errors=lambda: None)
    getmany = consumer.getmany

    async def serving_getmany(*partitions: TopicPartition, **options: Any) -> Any:
        serve()
        if max_wait_ms is not None:
            options["timeout_ms"] = min(options.get("timeout_ms", 0), max_wait_ms)
        return await getmany(*partitions, **options)

    consumer.getmany = serving_getmany


def remove_fetcher(consumer: Any) -> None:
    """Take the stand-ins out again, so the consumer closes as one never started."""
    consumer._fetcher = None
    consumer._coordinator = None
