"""SchemaRegistryClient against a small real HTTP registry on loopback, and the codec end to end."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from fastavro import parse_schema, schemaless_writer
from support.schema_registry import LoopbackRegistry

from schemas import registry
from schemas.codec import Codec
from schemas.errors import SchemaRegistryError, UnknownSchemaError
from schemas.models import InboundMessage
from schemas.schema_registry_client import CONTENT_TYPE, SchemaRegistryClient


@pytest.fixture
async def server() -> AsyncIterator[tuple[LoopbackRegistry, str]]:
    fake = LoopbackRegistry()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def client(server: tuple[LoopbackRegistry, str]) -> AsyncIterator[SchemaRegistryClient]:
    async with SchemaRegistryClient(server[1], timeout_s=5) as c:
        yield c


SCHEMA = {"type": "record", "name": "T", "namespace": "x", "fields": [{"name": "a", "type": "int"}]}


async def test_register_returns_the_id_and_sends_the_registry_content_type(
    server: tuple[LoopbackRegistry, str], client: SchemaRegistryClient
) -> None:
    fake, _ = server
    first = await client.register("x.T", json.dumps(SCHEMA))
    assert await client.register("x.T", json.dumps(SCHEMA)) == first
    assert await client.register("x.U", json.dumps({**SCHEMA, "name": "U"})) == first + 1
    assert fake.content_types == [CONTENT_TYPE] * 3
    assert fake.subjects == {"x.T": [first, first], "x.U": [first + 1]}


async def test_get_schema_returns_the_registered_schema(client: SchemaRegistryClient) -> None:
    schema_id = await client.register("x.T", json.dumps(SCHEMA))
    assert await client.get_schema(schema_id) == SCHEMA


async def test_unknown_id_raises_with_status_and_registry_error_code(
    client: SchemaRegistryClient,
) -> None:
    with pytest.raises(SchemaRegistryError) as info:
        await client.get_schema(999)
    error = info.value
    assert (error.status, error.error_code, error.message) == (
        404,
        40403,
        "GET /schemas/ids/999: Schema not found",
    )
    assert error.retriable is False
    assert "(HTTP 404, error_code 40403)" in str(error)


async def test_invalid_schema_is_a_non_retriable_422(client: SchemaRegistryClient) -> None:
    with pytest.raises(SchemaRegistryError) as info:
        await client.register("x.T", "{not json")
    assert (info.value.status, info.value.error_code, info.value.retriable) == (422, 42201, False)


async def test_server_error_is_retriable(client: SchemaRegistryClient) -> None:
    with pytest.raises(SchemaRegistryError) as info:
        await client.register("boom", json.dumps(SCHEMA))
    assert (info.value.status, info.value.error_code, info.value.retriable) == (500, 50001, True)


async def test_resolve_with_unreachable_registry_raises_retriable_registry_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    codec = Codec(SchemaRegistryClient(f"http://127.0.0.1:{port}", timeout_s=2))
    try:
        with pytest.raises(SchemaRegistryError) as info:
            await codec.resolve(7)
        assert info.value.retriable is True
    finally:
        await codec.aclose()


async def test_unreachable_registry_is_retriable_without_status() -> None:
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SchemaRegistryClient(f"http://127.0.0.1:{port}", timeout_s=2) as client:
        with pytest.raises(SchemaRegistryError) as info:
            await client.get_schema(1)
    assert (info.value.status, info.value.retriable) == (None, True)
    assert "ConnectError" in info.value.message


def _message() -> InboundMessage:
    return InboundMessage(
        message_id="01HX",
        tenant="acme",
        channel="chat",
        sender="u1",
        content="hello",
        created_at=datetime(2024, 5, 1, 12, tzinfo=UTC),
    )


async def test_codec_registers_every_schema_by_record_name_and_round_trips(
    server: tuple[LoopbackRegistry, str],
) -> None:
    fake, url = server
    codec = Codec(SchemaRegistryClient(url))
    await codec.start()
    try:
        assert set(fake.subjects) == set(registry.schema_names())
        schema_id = fake.subjects["switchboard.InboundMessage"][0]
        data = codec.encode(_message())
        assert data[:5] == b"\x00" + schema_id.to_bytes(4, "big")
        assert codec.decode(data, InboundMessage) == _message()
        assert json.loads(fake.schemas[schema_id]) == registry.raw_schema("InboundMessage")
    finally:
        await codec.aclose()


async def test_record_from_another_producer_decodes_after_resolve(
    server: tuple[LoopbackRegistry, str], client: SchemaRegistryClient
) -> None:
    _, url = server
    newer: dict[str, Any] = registry.raw_schema("InboundMessage")
    newer["fields"].append({"name": "locale", "type": "string", "default": "en"})
    schema_id = await client.register("switchboard.InboundMessage", json.dumps(newer))
    body = io.BytesIO()
    datum = _message().to_avro() | {"locale": "fr"}
    schemaless_writer(body, parse_schema(newer, named_schemas={}), datum)
    data = b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()

    codec = Codec(SchemaRegistryClient(url))
    await codec.start()
    try:
        with pytest.raises(UnknownSchemaError) as info:
            codec.decode(data, InboundMessage)
        assert info.value.schema_id == schema_id
        assert await codec.resolve(schema_id) == "switchboard.InboundMessage"
        assert codec.decode(data, InboundMessage) == _message()  # reader ignores "locale"
        assert codec.decode(codec.encode(_message()), InboundMessage) == _message()
    finally:
        await codec.aclose()


async def test_resolve_of_an_id_the_registry_lacks_is_an_unknown_schema_decode_error(
    server: tuple[LoopbackRegistry, str],
) -> None:
    codec = Codec(SchemaRegistryClient(server[1]))
    try:
        with pytest.raises(UnknownSchemaError) as info:
            await codec.resolve(4242)
        assert info.value.reason == (
            "Confluent framing: schema id 4242 unknown to the schema registry"
        )
        assert info.value.schema_id == 4242
        single_object = Codec().encode(_message())  # reads the other framing meanwhile
        assert codec.decode(single_object, InboundMessage) == _message()
    finally:
        await codec.aclose()


PROTOBUF = 'syntax = "proto3"; message T { int32 a = 1; }'


@pytest.mark.parametrize(
    ("schema_type", "schema", "reason"),
    [
        ("PROTOBUF", PROTOBUF, "is PROTOBUF, not AVRO"),
        ("AVRO", "[1, 2]", "is not a JSON object"),
        ("AVRO", "{not json", "no valid schema string"),
    ],
)
async def test_an_unusable_schema_is_not_retriable_and_its_records_are_undecodable(
    server: tuple[LoopbackRegistry, str], schema_type: str, schema: str, reason: str
) -> None:
    fake, url = server
    fake.schemas[555] = schema
    fake.schema_types[555] = schema_type
    async with SchemaRegistryClient(url, timeout_s=5) as client:
        with pytest.raises(SchemaRegistryError) as info:
            await client.get_schema(555)
    assert info.value.retriable is False  # retrying gets the same answer: no endless retry
    assert reason in info.value.message

    codec = Codec(SchemaRegistryClient(url, timeout_s=5))
    try:
        with pytest.raises(UnknownSchemaError) as unknown:
            await codec.resolve(555)
        assert unknown.value.schema_id == 555
        assert reason in unknown.value.reason
    finally:
        await codec.aclose()


async def test_resolve_unknown_fetches_each_missing_id_once_and_remembers_the_unknown_ones(
    server: tuple[LoopbackRegistry, str], client: SchemaRegistryClient
) -> None:
    fake, url = server
    newer: dict[str, Any] = registry.raw_schema("InboundMessage")
    newer["fields"].append({"name": "locale", "type": "string", "default": "en"})
    schema_id = await client.register("switchboard.InboundMessage", json.dumps(newer))
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(newer, named_schemas={}), _message().to_avro())
    data = b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()
    lost = b"\x00" + (4242).to_bytes(4, "big") + body.getvalue()

    codec = Codec(SchemaRegistryClient(url, timeout_s=5))
    await codec.start()
    try:
        fake.fetched.clear()
        values = [data, lost, data, None, b"", Codec().encode(_message()), lost]
        assert await codec.resolve_unknown(values) == {4242}
        assert sorted(fake.fetched) == sorted([4242, schema_id])
        assert codec.decode(data, InboundMessage) == _message()
        # the dead letter's reason says what the registry answered
        with pytest.raises(UnknownSchemaError, match="schema id 4242 unknown to the schema reg"):
            codec.decode(lost, InboundMessage)

        assert await codec.resolve_unknown([data, lost]) == {4242}
        assert sorted(fake.fetched) == sorted([4242, schema_id])  # neither asked again
    finally:
        await codec.aclose()


async def test_resolve_unknown_without_a_registry_does_nothing() -> None:
    lost = b"\x00" + (9).to_bytes(4, "big") + b"\x02"
    assert await Codec().resolve_unknown([lost]) == set()


async def test_an_id_the_registry_refuses_is_unknown_but_an_access_error_is_not(
    server: tuple[LoopbackRegistry, str],
) -> None:
    fake, url = server
    fake.statuses.update({600: 422, 601: 401})
    codec = Codec(SchemaRegistryClient(url, timeout_s=5))
    try:
        refused = r"schema id 600 not usable: GET /schemas/ids/600: refused \(HTTP 422\)"
        with pytest.raises(UnknownSchemaError, match=refused):
            await codec.resolve(600)
        with pytest.raises(SchemaRegistryError) as info:  # wrong credentials: stop, loudly
            await codec.resolve(601)
        assert not isinstance(info.value, UnknownSchemaError)
        assert (info.value.status, info.value.retriable) == (401, False)
    finally:
        await codec.aclose()


async def test_an_id_beyond_a_java_int_is_never_asked_for(
    server: tuple[LoopbackRegistry, str],
) -> None:
    fake, url = server
    garbage = b"\x00\xff\xff\xff\xff" + b"\x02"
    codec = Codec(SchemaRegistryClient(url, timeout_s=5))
    try:
        assert await codec.resolve_unknown([garbage]) == {2**32 - 1}
        assert fake.fetched == []
        with pytest.raises(UnknownSchemaError, match="beyond the registry's id range"):
            codec.decode(garbage, InboundMessage)
    finally:
        await codec.aclose()
