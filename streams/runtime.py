"""Everything a worker's agents share, built once per process from Settings and the config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from connectors.delivery.base import DeliveryConnector
from connectors.delivery.registry import build_connector
from connectors.llm.base import LLMEngine
from connectors.llm.knowledge_loader import load_knowledge_base
from connectors.llm.local import LocalEngine
from connectors.llm.openai_engine import build_openai_engine
from connectors.llm.ratelimit import ProviderRateLimiter
from connectors.llm.resilient import ResilientEngine
from connectors.redis_store import IdempotencyStore, connect_redis
from processors.config import SwitchboardConfig
from processors.knowledge import KnowledgeBase
from processors.router import Router
from schemas.codec import Codec
from schemas.models import (
    AvroRecord,
    Channel,
    ConversationEvent,
    DeliveryRequest,
    InboundMessage,
    LLMRequest,
    LLMResponse,
)
from schemas.schema_registry_client import SchemaRegistryClient
from streams.metrics import track_codec
from streams.pool import CallPool
from streams.settings import Settings
from streams.transport import Producer

__all__ = ["Runtime", "UnconfiguredChannelError"]

log = logging.getLogger(__name__)

CONSUMED_RECORDS: frozenset[type[AvroRecord]] = frozenset(
    {InboundMessage, ConversationEvent, LLMRequest, LLMResponse, DeliveryRequest}
)
"""The record types the worker's stages consume: the ones its codec keeps for reuse
(``Codec(remember_types=...)``); dead letters, delivery reports and analytics records are
read by no stage."""


class UnconfiguredChannelError(LookupError):
    """No connector is configured for a delivery channel."""


def build_engines(
    config: SwitchboardConfig,
    knowledge_bases: Mapping[str, KnowledgeBase],
    env: Mapping[str, str],
) -> dict[str, ResilientEngine]:
    """One engine per entry of ``config.engines``, each behind timeouts, retries and limits.

    Raises:
        ValueError: an OpenAI engine's API key variable is not set.
    """
    engines: dict[str, ResilientEngine] = {}
    for name, engine_cfg in config.engines.items():
        inner: LLMEngine
        if engine_cfg.kind == "local":
            inner = LocalEngine(knowledge_bases, latency_s=engine_cfg.latency_s)
        else:
            inner = build_openai_engine(engine_cfg, env)
        engines[name] = ResilientEngine(
            inner, engine_cfg, limiter=ProviderRateLimiter.from_config(engine_cfg)
        )
    return engines


@dataclass
class Runtime:
    """Shared, process-wide dependencies of the agents.

    Synchronous parts (config, router, codec, knowledge bases, engines) are built in the
    constructor so config errors surface before the worker joins its consumer group; network
    clients are opened by ``start()``.
    """

    settings: Settings
    config: SwitchboardConfig
    codec: Codec = field(init=False)
    router: Router = field(init=False)
    engines: dict[str, ResilientEngine] = field(init=False)
    redis: aioredis.Redis | None = field(init=False, default=None)
    idempotency: IdempotencyStore | None = field(init=False, default=None)
    kafka: Producer | None = field(init=False, default=None)
    """The worker's producer (set by ``streams.worker`` before any stage runs)."""
    llm_pool: CallPool[Any] | None = field(init=False, default=None)
    """The LLM stage's calls in flight and waiting (set by the stage; drained on shutdown)."""
    failed: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    """Set by :meth:`fail`: the worker stops (status 1), as when a stage's batch fails."""
    failure: BaseException | None = field(init=False, default=None)
    """The first error passed to :meth:`fail`."""
    _connectors: dict[Channel, DeliveryConnector] = field(init=False, default_factory=dict)
    _start_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        registry = (
            SchemaRegistryClient(self.settings.schema_registry_url)
            if self.settings.schema_registry_url
            else None
        )
        self.codec = Codec(
            registry,
            remember=self.settings.reuse_encoded_records,
            remember_types=CONSUMED_RECORDS,
        )
        track_codec(self.codec)
        self.router = Router(self.config)
        kbs = {name: load_knowledge_base(kb) for name, kb in self.config.knowledge_bases.items()}
        self.engines = build_engines(self.config, kbs, self.settings.engine_env())

    def fail(self, exc: BaseException) -> None:
        """Stop the worker for ``exc``: an error outside any batch (e.g. an LLM response the
        broker refused for good) that retrying cannot get past."""
        if self.failure is None:
            self.failure = exc
        self.failed.set()

    async def start(self) -> None:
        """Open Redis and register schemas (idempotent; safe to call from every agent)."""
        async with self._start_lock:
            if self._started:
                return
            self.redis = await connect_redis(self.settings.redis_url)
            self.idempotency = IdempotencyStore(self.redis, namespace=self.settings.app_id)
            await self.codec.start()
            self._started = True

    @property
    def producer(self) -> Producer:
        """The worker's Kafka producer."""
        if self.kafka is None:
            raise RuntimeError("the worker's producer is not set")
        return self.kafka

    @property
    def store(self) -> IdempotencyStore:
        """The Redis idempotency store (after ``start()``)."""
        if self.idempotency is None:
            raise RuntimeError("Runtime.start() was not awaited")
        return self.idempotency

    def connector(self, channel: Channel) -> DeliveryConnector:
        """The connector configured for ``channel`` (built on first use).

        Raises:
            UnconfiguredChannelError: ``channels`` in the config has no entry for it.
        """
        found = self._connectors.get(channel)
        if found is not None:
            return found
        channel_cfg = self.config.channels.get(channel)
        if channel_cfg is None:
            raise UnconfiguredChannelError(
                f"no connector configured for channel {channel.value!r} "
                f"(configured: {sorted(c.value for c in self.config.channels)})"
            )
        built = build_connector(
            channel_cfg.connector, channel_cfg.options, data_dir=Path(self.settings.data_dir)
        )
        self._connectors[channel] = built
        return built

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` seconds for the LLM calls in flight (and the requests
        waiting for a slot, which they take in turn); return how many calls and waiting
        requests remain.

        Called after the consumers stopped and before the producer's final flush, so the
        responses of calls that finish in time are sent; the rest are cancelled (so that no
        call runs into closed engines and answers with an apology) and re-issued by the
        conversation agent once their deadline passes.
        """
        return await self.llm_pool.drain(timeout_s) if self.llm_pool is not None else 0

    async def aclose(self) -> None:
        """Close connectors, engines, the codec and Redis."""
        for conn in self._connectors.values():
            await conn.aclose()
        for engine in self.engines.values():
            await engine.aclose()
        await self.codec.aclose()
        if self.redis is not None:
            await self.redis.aclose()
