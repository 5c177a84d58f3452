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

__all__ = ["install_fetcher", "remove_fetcher"]


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
