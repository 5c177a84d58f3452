"""IdempotencyStore and connect_redis against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from connectors.redis_store import (
    MARK_SCRIPT_KEYS,
    IdempotencyStore,
    StoreError,
    connect_redis,
    redact_url,
)
from streams.embedded import ManagedProcess, find_free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(redis_server: ManagedProcess) -> AsyncIterator[redis.asyncio.Redis]:
    connected = await connect_redis(f"redis://{redis_server.address}/0")
    yield connected
    await connected.aclose()


@pytest.fixture
def store(client: redis.asyncio.Redis) -> IdempotencyStore:
    return IdempotencyStore(client, namespace=f"test-{uuid.uuid4().hex[:8]}")


async def test_second_claim_of_the_same_key_fails(store: IdempotencyStore) -> None:
    assert await store.claim("delivery-1", ttl_s=60) is True
    assert await store.claim("delivery-1", ttl_s=60) is False
    assert await store.claim("delivery-2", ttl_s=60) is True


async def test_only_one_of_many_concurrent_claims_wins(store: IdempotencyStore) -> None:
    results = await asyncio.gather(*(store.claim("race", ttl_s=60) for _ in range(50)))
    assert results.count(True) == 1


async def test_released_key_can_be_claimed_again(store: IdempotencyStore) -> None:
    assert await store.claim("k", ttl_s=60) is True
    assert await store.release("k") is True
    assert await store.seen("k") is False
    assert await store.claim("k", ttl_s=60) is True
    assert await store.release("never-set") is False


async def test_mark_makes_a_key_seen_with_the_given_ttl(
    store: IdempotencyStore, client: redis.asyncio.Redis
) -> None:
    assert await store.seen("m-1") is False
    await store.mark("m-1", ttl_s=120)
    assert await store.seen("m-1") is True
    assert await store.claim("m-1", ttl_s=5) is False
    assert 110 <= await client.ttl(store.key("m-1")) <= 120  # claim kept the mark's TTL
    assert await client.get(store.key("m-1")) == b"1"


async def test_claimed_key_expires_after_its_ttl(store: IdempotencyStore) -> None:
    assert await store.claim("short", ttl_s=1) is True
    assert await store.seen("short") is True
    await asyncio.sleep(1.2)
    assert await store.seen("short") is False
    assert await store.claim("short", ttl_s=1) is True


async def test_keys_are_prefixed_and_namespaces_isolate_them(
    client: redis.asyncio.Redis,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    ingest = IdempotencyStore(client, namespace=f"ingest-{suffix}")
    delivery = IdempotencyStore(client, namespace=f"delivery-{suffix}")

    assert await ingest.claim("id-1", ttl_s=60) is True
    assert await delivery.seen("id-1") is False
    assert await delivery.claim("id-1", ttl_s=60) is True
    assert await client.exists(f"ingest-{suffix}:id-1", f"delivery-{suffix}:id-1") == 2
    assert await client.exists("id-1") == 0
    assert await delivery.release("id-1") is True
    assert await ingest.seen("id-1") is True


@pytest.mark.parametrize("ttl_s", [0, -5, True])
async def test_ttl_below_one_second_is_rejected(store: IdempotencyStore, ttl_s: int) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await store.claim("k", ttl_s=ttl_s)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.mark("k", ttl_s=ttl_s)


def test_empty_namespace_is_rejected(client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="namespace"):
        IdempotencyStore(client, namespace="")


async def test_connect_redis_on_a_dead_port_names_the_url() -> None:
    url = f"redis://127.0.0.1:{find_free_port()}/0"
    with pytest.raises(ConnectionError, match=f"cannot reach Redis at {url}"):
        await connect_redis(url, timeout_s=1.0)


async def test_connect_redis_error_does_not_leak_the_password() -> None:
    port = find_free_port()
    with pytest.raises(ConnectionError) as info:
        await connect_redis(f"redis://app:s3cret@127.0.0.1:{port}/0", timeout_s=1.0)
    assert "s3cret" not in str(info.value)
    assert f"redis://app:***@127.0.0.1:{port}/0" in str(info.value)
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


async def test_store_on_an_unreachable_redis_raises_retriable_store_error() -> None:
    # from_url clients do not retry commands themselves (Redis(host=...) retries 10 times)
    dead = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{find_free_port()}/0")
    store = IdempotencyStore(dead, namespace="dead")
    try:
        with pytest.raises(StoreError) as info:
            await store.claim("k", ttl_s=10)
        assert info.value.retriable is True
        assert "dead:k" in str(info.value)
    finally:
        await dead.aclose()


async def test_many_keys_are_marked_and_looked_up_in_order_in_one_round_trip(
    store: IdempotencyStore, client: redis.asyncio.Redis
) -> None:
    await store.mark_many(["b1", "b3"], ttl_s=60)
    assert await store.seen_many(["b1", "b2", "b3"]) == [True, False, True]
    assert await store.seen_many([]) == []
    assert 0 < await client.ttl(store.key("b3")) <= 60


async def test_mark_many_covers_more_keys_than_one_script_call_and_replaces_ttls(
    store: IdempotencyStore, client: redis.asyncio.Redis
) -> None:
    keys = [f"m{i}" for i in range(2 * MARK_SCRIPT_KEYS + 7)]
    await client.set(store.key("m3"), 1, ex=5)

    await store.mark_many(keys, ttl_s=600)

    assert await store.seen_many(keys) == [True] * len(keys)
    assert await store.seen_many(["m-not-marked"]) == [False]
    ttls = [await client.ttl(store.key(k)) for k in (keys[0], "m3", keys[-1])]
    assert all(590 < ttl <= 600 for ttl in ttls), ttls
    assert await client.get(store.key(keys[-1])) == b"1"


async def test_a_read_only_replica_is_a_retriable_error_not_a_crash(
    store: IdempotencyStore, client: redis.asyncio.Redis
) -> None:
    # what a worker sees while Redis fails over: its server was demoted to a replica
    await client.execute_command("REPLICAOF", "127.0.0.1", str(find_free_port()))
    try:
        with pytest.raises(StoreError) as info:
            await store.mark_many(["r1"], ttl_s=60)
    finally:
        await client.execute_command("REPLICAOF", "NO", "ONE")
    assert info.value.retriable is True
    assert "READONLY" in str(info.value)
    await store.mark_many(["r1"], ttl_s=60)  # a primary again: the retry succeeds
    assert await store.seen_many(["r1"]) == [True]
