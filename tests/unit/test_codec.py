"""Codec: round trips of every record in both framings and JSON; a precise reason per bad input."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.avro_data import records

from schemas import registry
from schemas.codec import SINGLE_OBJECT_MAGIC, Codec
from schemas.errors import DecodeError, EncodeError, SchemaError, UnknownSchemaError
from schemas.models import AvroRecord, DeadLetter, InboundMessage, LLMRequest
from schemas.schema_registry_client import InMemorySchemaRegistry

NAMES = registry.schema_names()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def confluent_codec() -> Iterator[Codec]:
    codec = Codec(InMemorySchemaRegistry())
    asyncio.run(codec.start())
    yield codec
    asyncio.run(codec.aclose())


def inbound(**changes: Any) -> InboundMessage:
    fields: dict[str, Any] = {
        "message_id": "01HX",
        "tenant": "acme",
        "channel": "sms",
        "sender": "+15550100",
        "content": "hello",
        "created_at": datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC),
    }
    return InboundMessage.model_validate(fields | changes)


def inbound_json(**changes: Any) -> bytes:
    doc = {
        "message_id": "01HX",
        "tenant": "acme",
        "channel": "sms",
        "sender": "+15550100",
        "content": "hello",
        "created_at": "2024-05-01T12:00:00.250Z",
    }
    return json.dumps({k: v for k, v in (doc | changes).items() if v is not ...}).encode()


def reason_of(call: Any, *args: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        call(*args)
    return info.value


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_single_object_round_trip_returns_the_original_record(
    codec: Codec, name: str, data: st.DataObject
) -> None:
    record = data.draw(records(name))
    encoded = codec.encode(record)
    assert encoded[:10] == SINGLE_OBJECT_MAGIC + registry.fingerprint(name)
    assert codec.decode(encoded, type(record)) == record


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_to_avro_is_model_dump_of_every_record(name: str, data: st.DataObject) -> None:
    record = data.draw(records(name))
    datum = record.to_avro()
    assert datum == record.model_dump(mode="python")
    assert datum is not record.__dict__  # a copy: fastavro may not change the record
    for value in datum.values():  # nested records as dicts, as fastavro needs them
        assert not isinstance(value, AvroRecord)
        if isinstance(value, list):
            assert not any(isinstance(item, AvroRecord) for item in value)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_confluent_round_trip_returns_the_original_record(
    confluent_codec: Codec, name: str, data: st.DataObject
) -> None:
    record = data.draw(records(name))
    encoded = confluent_codec.encode(record)
    assert encoded[0] == 0
    assert confluent_codec.decode(encoded, type(record)) == record


@FAST
@given(record=records("InboundMessage"), epoch_ms=st.booleans())
def test_json_inbound_round_trip_equals_the_avro_record(
    codec: Codec, record: InboundMessage, epoch_ms: bool
) -> None:
    doc = record.model_dump(mode="json")
    if epoch_ms:
        doc["created_at"] = (record.created_at - EPOCH) // timedelta(milliseconds=1)
    decoded = codec.decode_inbound(json.dumps(doc).encode())
    assert decoded == record
    assert codec.decode_inbound(codec.encode(decoded)) == record


def test_json_timestamps_are_normalised_to_utc_milliseconds(codec: Codec) -> None:
    message = codec.decode_inbound(
        inbound_json(created_at="2024-05-01T14:00:00.123456+02:00", scheduled_for=1714564800001)
    )
    assert message.created_at == datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert message.scheduled_for == datetime(2024, 5, 1, 12, 0, 0, 1000, tzinfo=UTC)


def test_decode_inbound_accepts_avro_as_well_as_json(codec: Codec) -> None:
    assert codec.decode_inbound(codec.encode(inbound())) == inbound()


def test_older_writer_schema_is_resolved_against_the_current_reader(codec: Codec) -> None:
    old = registry.raw_schema("InboundMessage")
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("ttl_ms", "routing_slip")]
    parsed = parse_schema(old, named_schemas={})
    body = io.BytesIO()
    schemaless_writer(body, parsed, inbound(ttl_ms=5).to_avro())  # ttl_ms is not written
    data = SINGLE_OBJECT_MAGIC + registry.schema_fingerprint(old) + body.getvalue()
    error = reason_of(codec.decode, data, InboundMessage)
    assert isinstance(error, UnknownSchemaError)
    assert error.fingerprint == registry.schema_fingerprint(old)
    local = Codec()
    local.add_writer_schema(old)
    assert local.decode(data, InboundMessage) == inbound()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_decode_any_returns_the_model_the_writer_schema_names(
    codec: Codec, name: str, data: st.DataObject
) -> None:
    record = data.draw(records(name))
    decoded = codec.decode_any(codec.encode(record))
    assert type(decoded) is type(record)
    assert decoded == record


def test_decode_any_refuses_a_writer_record_that_is_not_bundled() -> None:
    schema = {"type": "record", "name": "Stranger", "namespace": "x", "fields": []}
    local = Codec()
    local.add_writer_schema(schema)
    data = SINGLE_OBJECT_MAGIC + registry.schema_fingerprint(schema)
    error = reason_of(local.decode_any, data)
    assert error.reason == (
        f"writer schema x.Stranger (fingerprint 0x{data[2:].hex()}) is not a bundled record"
    )


def test_parsed_schemas_are_cached_per_process() -> None:
    for name in NAMES:
        assert registry.parsed_schema(name) is registry.parsed_schema(name.split(".")[1])


# --- fingerprints --------------------------------------------------------------------------------


def _rabin_fingerprint(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro 1.11.1 specification's reference code computes it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


@pytest.mark.parametrize(
    ("schema", "expected"),
    [  # published vectors, Apache Avro share/test/data/schema-tests.txt
        ("null", 7195948357588979594),
        ("boolean", -6970731678124411036),
        ("int", 8247732601305521295),
        ({"type": "fixed", "name": "foo", "size": 15}, 1756455273707447556),
    ],
)
def test_fingerprint_matches_avro_test_vectors(schema: Any, expected: int) -> None:
    assert registry.schema_fingerprint(schema) == expected.to_bytes(8, "little", signed=True)


@pytest.mark.parametrize("name", NAMES)
def test_bundled_fingerprint_is_little_endian_crc64_of_canonical_form(name: str) -> None:
    expected = _rabin_fingerprint(registry.canonical_form(name).encode()).to_bytes(8, "little")
    assert registry.fingerprint(name) == expected


# --- bad input: one precise reason each -------------------------------------------------------


def test_empty_record_is_reported_as_empty(codec: Codec) -> None:
    for data in (b"", None):
        error = reason_of(codec.decode_inbound, data)
        assert (error.error_type, error.reason) == (
            "EmptyRecord",
            "empty record (zero bytes or tombstone)",
        )
    assert reason_of(codec.decode, b"", InboundMessage).error_type == "EmptyRecord"
    assert reason_of(codec.decode_inbound, b" \n\t").error_type == "EmptyRecord"


def test_garbage_bytes_name_the_first_byte(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, b"\x7fELF\x02\x01")
    assert (error.error_type, error.reason) == ("DecodeError", "not Avro or JSON: first byte 0x7f")
    assert reason_of(codec.decode, b"\x7f", InboundMessage).reason == "not Avro: first byte 0x7f"


def test_json_is_refused_outside_the_inbound_topic(codec: Codec) -> None:
    assert (
        reason_of(codec.decode, inbound_json(), InboundMessage).reason
        == "not Avro: first byte 0x7b"
    )


def test_wrong_single_object_magic_byte_is_named(codec: Codec) -> None:
    data = codec.encode(inbound())
    error = reason_of(codec.decode, b"\xc3\x02" + data[2:], InboundMessage)
    assert (error.error_type, error.reason) == (
        "DecodeError",
        "single-object encoding: wrong magic bytes c3 02 (expected c3 01)",
    )
    short = reason_of(codec.decode_inbound, data[:6])
    assert short.reason == "single-object encoding: header is 6 bytes, expected 10"
    assert reason_of(codec.decode, b"\x00\x00\x01", InboundMessage).reason == (
        "Confluent framing: header is 3 bytes, expected 5"
    )


def test_unknown_fingerprint_is_unknown_schema(codec: Codec) -> None:
    error = reason_of(codec.decode, SINGLE_OBJECT_MAGIC + bytes(8) + b"\x00", InboundMessage)
    assert isinstance(error, UnknownSchemaError)
    assert (error.error_type, error.reason) == (
        "UnknownSchema",
        "single-object encoding: unknown schema fingerprint 0x0000000000000000",
    )
    assert (error.fingerprint, error.schema_id) == (bytes(8), None)


def test_unknown_confluent_schema_id_is_unknown_schema(codec: Codec) -> None:
    error = reason_of(codec.decode, b"\x00\x00\x00\x00\x07\x02", InboundMessage)
    assert isinstance(error, UnknownSchemaError)
    assert (error.reason, error.schema_id) == ("Confluent framing: unknown schema id 7", 7)


def test_truncated_avro_body_is_reported_as_truncated(codec: Codec) -> None:
    data = codec.encode(inbound(ttl_ms=60_000))
    for cut in range(10, len(data)):
        error = reason_of(codec.decode, data[:cut], InboundMessage)
        assert error.error_type == "DecodeError"
        assert error.reason.startswith("truncated Avro body for switchboard.InboundMessage: "), (
            cut,
            error.reason,
        )


def test_trailing_bytes_after_the_datum_are_refused(codec: Codec) -> None:
    data = codec.encode(inbound())
    error = reason_of(codec.decode, data + b"\x00\x01", InboundMessage)
    assert error.reason == (
        f"2 trailing bytes after the switchboard.InboundMessage datum "
        f"(datum ends at byte {len(data)} of {len(data) + 2})"
    )


def test_record_of_another_type_does_not_resolve_to_the_expected_one(codec: Codec) -> None:
    letter = DeadLetter(
        dead_letter_id="d",
        stage="s",
        reason="r",
        error_type="e",
        source_topic="t",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    error = reason_of(codec.decode, codec.encode(letter), InboundMessage)
    assert error.reason.startswith("writer schema switchboard.DeadLetter (fingerprint 0x")
    assert error.reason.endswith("does not resolve to reader switchboard.InboundMessage")


def test_enum_index_out_of_range_is_invalid_avro(codec: Codec) -> None:
    data = bytearray(codec.encode(inbound()))
    assert data[10:20] == b"\x0801HX\x08acme"  # message_id, tenant...; channel index follows
    data[10 + 5 + 5] = 0x7E  # channel symbol index 63
    error = reason_of(codec.decode, bytes(data), InboundMessage)
    assert "enum symbol or union branch index out of range" in error.reason


def test_json_missing_required_fields_lists_each_field(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(content=..., created_at=...))
    assert (error.error_type, error.reason) == (
        "ValidationError",
        "JSON validation failed: content: Field required; created_at: Field required",
    )


def test_json_wrong_types_list_each_field_path(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(channel="fax", recipients=["a", 2]))
    assert error.error_type == "ValidationError"
    assert error.reason == (
        "JSON validation failed: channel: Input should be 'chat', 'sms', 'whatsapp', 'voice', "
        "'email', 'webhook' or 'outbox'; recipients[1]: Input should be a valid string"
    )


@pytest.mark.parametrize(
    ("value", "shown"), [(True, "True (bool)"), ("60", "'60' (str)"), (1.0, "1.0 (float)")]
)
def test_json_value_pydantic_would_coerce_is_refused_like_avro(
    codec: Codec, value: Any, shown: str
) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(ttl_ms=value))
    assert (
        error.reason
        == f"JSON validation failed: ttl_ms: Avro type null | long does not accept {shown}"
    )


def test_json_long_out_of_avro_range_is_refused(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(ttl_ms=2**63))
    assert error.reason.startswith("JSON validation failed: ttl_ms: Avro type null | long")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (
            "2024-05-01T12:00:00",
            "ISO-8601 timestamp '2024-05-01T12:00:00' has no UTC offset (add Z)",
        ),
        ("yesterday", "not an ISO-8601 timestamp: 'yesterday'"),
        (1714564800.5, "expected an ISO-8601 string or integer epoch milliseconds, got a number"),
        (10**20, "timestamp out of range: 100000000000000000000"),
    ],
)
def test_json_bad_timestamp_gives_the_field_and_why(codec: Codec, value: Any, why: str) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(created_at=value))
    assert error.reason == f"JSON validation failed: created_at: {why}"


def test_json_unknown_field_is_refused(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(locale="en"))
    assert error.reason == "JSON validation failed: locale: Extra inputs are not permitted"


def test_json_array_instead_of_object_is_refused(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, b'[{"message_id": "1"}]')
    assert (error.error_type, error.reason) == (
        "ValidationError",
        "JSON value is an array, expected an object",
    )


def test_invalid_utf8_in_json_gives_the_byte_position(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, b'{"content": "caf\xe9"}')
    assert (error.error_type, error.reason) == ("DecodeError", "invalid UTF-8 in JSON at byte 16")


def test_invalid_json_gives_line_and_column(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, b'{\n  "tenant": "acme",\n  "content" "x"\n}')
    assert error.reason == "invalid JSON at line 3 column 13: Expecting ':' delimiter"


def test_json_duplicate_keys_and_nan_are_refused(codec: Codec) -> None:
    assert (
        reason_of(codec.decode_inbound, b'{"a": 1, "a": 2}').reason
        == "invalid JSON: duplicate key 'a'"
    )
    assert (
        reason_of(codec.decode_inbound, b'{"a": NaN}').reason
        == "invalid JSON: NaN is not valid JSON"
    )


def test_deeply_nested_json_is_refused_not_crashed(codec: Codec) -> None:
    data = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert reason_of(codec.decode_inbound, data).reason == "invalid JSON: nested too deeply"


def test_add_writer_schema_refuses_a_non_record_or_invalid_schema(codec: Codec) -> None:
    with pytest.raises(SchemaError, match="not an Avro record schema"):
        Codec().add_writer_schema({"type": "enum", "name": "E", "symbols": ["a"]})
    with pytest.raises(SchemaError, match="invalid writer schema"):
        Codec().add_writer_schema({"type": "record", "name": "R", "fields": [{"name": "x"}]})


def test_json_string_that_avro_cannot_encode_is_refused(codec: Codec) -> None:
    error = reason_of(codec.decode_inbound, inbound_json(content="\ud800"))
    assert error.error_type == "ValidationError"
    assert "not Avro-encodable: UnicodeEncodeError" in error.reason


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64) | st.text(max_size=40).map(str.encode))
def test_decode_inbound_raises_only_decode_errors_on_arbitrary_bytes(
    codec: Codec, data: bytes
) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode_inbound(data)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80))
def test_decode_raises_only_decode_errors_on_arbitrary_avro_bodies(
    codec: Codec, body: bytes
) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode(SINGLE_OBJECT_MAGIC + registry.fingerprint("LLMRequest") + body, LLMRequest)


# --- encoding errors and setup -------------------------------------------------------------------


def test_value_out_of_avro_range_raises_encode_error(codec: Codec) -> None:
    with pytest.raises(EncodeError, match=r"cannot encode switchboard\.InboundMessage: ValueError"):
        codec.encode(inbound(ttl_ms=2**63))


def test_registry_codec_refuses_to_encode_before_start() -> None:
    with pytest.raises(SchemaError, match="codec not started"):
        Codec(InMemorySchemaRegistry()).encode(inbound())


async def test_resolve_without_registry_is_a_schema_error(codec: Codec) -> None:
    with pytest.raises(SchemaError, match="no schema registry"):
        await codec.resolve(7)
