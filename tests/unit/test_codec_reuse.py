"""Codec(remember=N): consuming bytes the codec itself encoded returns the record encoded,
exactly what decoding them would have given, and only while it is kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from support.avro_data import records

from schemas import registry
from schemas.codec import Codec
from schemas.errors import DecodeError
from schemas.models import AvroRecord, ConversationEvent, LLMRequest, utcnow
from streams.metrics import track_codec

NAMES = registry.schema_names()


def event(n: int = 0, **changes: Any) -> ConversationEvent:
    now = utcnow()
    fields: dict[str, Any] = {
        "event_id": f"e-{n}",
        "conversation_id": "c-1",
        "tenant": "acme",
        "content": f"turn {n}",
        "sender": "user@acme.test",
        "origin_created_at": now,
        "created_at": now,
    }
    return ConversationEvent(**(fields | changes))


def test_a_kept_record_is_returned_once_without_decoding() -> None:
    codec = Codec(remember=8)
    record = event()
    data = codec.encode(record)
    assert codec.remembered == 1
    assert codec.decode(data, ConversationEvent) is record
    assert codec.reused == 1
    assert codec.remembered == 0
    again = codec.decode(data, ConversationEvent)  # redelivered: decoded from its bytes
    assert again == record
    assert again is not record
    assert codec.reused == 1


def test_decode_any_reuses_too() -> None:
    codec = Codec(remember=8)
    record = event()
    assert codec.decode_any(codec.encode(record)) is record


def test_nothing_is_kept_by_default() -> None:
    codec = Codec()
    record = event()
    data = codec.encode(record)
    assert codec.remembered == 0
    assert codec.decode(data, ConversationEvent) is not record
    assert codec.reused == 0


def test_only_the_newest_records_are_kept() -> None:
    codec = Codec(remember=2)
    first, second, third = (event(n) for n in range(3))
    encoded = [codec.encode(r) for r in (first, second, third)]
    assert codec.remembered == 2
    assert codec.decode(encoded[0], ConversationEvent) is not first
    assert codec.decode(encoded[1], ConversationEvent) is second
    assert codec.decode(encoded[2], ConversationEvent) is third


def test_only_the_types_asked_for_are_kept() -> None:
    codec = Codec(remember=8, remember_types={LLMRequest})
    codec.encode(event())
    assert codec.remembered == 0


def test_kept_bytes_are_capped_and_a_record_over_a_quarter_of_the_cap_is_not_kept() -> None:
    size = len(Codec().encode(event(0, content="x" * 100)))
    codec = Codec(remember=100, remember_bytes=size * 4)
    records = [event(n, content="x" * 100) for n in range(5)]
    encoded = [codec.encode(r) for r in records]
    assert codec.remembered == 4  # by bytes, not by count
    assert codec.decode(encoded[0], ConversationEvent) is not records[0]
    assert codec.decode(encoded[1], ConversationEvent) is records[1]
    codec.encode(event(9, content="x" * (size * 2)))  # over a quarter of the cap
    assert codec.remembered == 3


def test_bytes_encoded_again_are_kept_as_the_newest() -> None:
    codec = Codec(remember=2)
    first, second, third = (event(n) for n in range(3))
    data = codec.encode(first)
    codec.encode(second)
    assert codec.encode(first) == data  # the same record again: moves to the newest
    codec.encode(third)  # pushes out the oldest: second
    assert codec.decode(data, ConversationEvent) is first
    assert codec.remembered == 1


def test_bytes_read_as_another_model_are_decoded_and_refused() -> None:
    codec = Codec(remember=8)
    data = codec.encode(event())
    with pytest.raises(DecodeError, match="does not resolve"):
        codec.decode(data, LLMRequest)
    assert codec.reused == 0


def test_a_copy_of_the_bytes_finds_the_record() -> None:
    """The consumer hands over new bytes objects, equal to the ones produced."""
    codec = Codec(remember=8)
    record = event()
    data = codec.encode(record)
    assert codec.decode(bytes(bytearray(data)), ConversationEvent) is record


@pytest.mark.parametrize(
    "created_at",
    [
        datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),  # sub-millisecond: truncated by Avro
        datetime(2026, 1, 2, 5, 4, 5, 123000, tzinfo=timezone(timedelta(hours=2))),
    ],
    ids=["microseconds", "utc+2"],
)
def test_records_that_would_not_decode_back_equal_are_not_kept(created_at: datetime) -> None:
    codec = Codec(remember=8)
    record = event(created_at=created_at)
    data = codec.encode(record)
    assert codec.remembered == 0
    decoded = codec.decode(data, ConversationEvent)
    assert decoded.created_at.tzinfo is UTC
    assert decoded.created_at.microsecond == 123000
    # what a reused record would have held instead:
    assert (created_at.tzinfo, created_at.microsecond) != (UTC, 123000)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_kept_record_equals_what_decoding_its_bytes_gives(name: str, data: st.DataObject) -> None:
    record: AvroRecord = data.draw(records(name))  # timestamps: whole ms, UTC
    keeping, plain = Codec(remember=4), Codec()
    encoded = keeping.encode(record)
    decoded = plain.decode(encoded, type(record))
    assert keeping.remembered == 1  # such a record is always kept
    assert keeping.decode(encoded, type(record)) is record
    assert decoded == record


def _types(schema: Any, named: dict[str, Any], depth: int, out: list[tuple[int, Any]]) -> None:
    if isinstance(schema, str):
        if schema in named and isinstance(named[schema], dict):
            _types(named[schema], named, depth, out)
        else:
            out.append((depth, schema))
    elif isinstance(schema, list):
        for branch in schema:
            _types(branch, named, depth, out)
    else:
        out.append((depth, schema.get("logicalType") or schema["type"]))
        if schema["type"] == "record":
            for f in schema["fields"]:
                _types(f["type"], named, depth + 1, out)
        elif schema["type"] == "array":
            _types(schema["items"], named, depth, out)
        elif schema["type"] == "map":
            _types(schema["values"], named, depth, out)


@pytest.mark.parametrize("name", NAMES)
def test_what_the_round_trip_check_relies_on_holds_for_the_bundled_schemas(name: str) -> None:
    """``_round_trips`` checks top-level timestamps only, and no ``float`` (which loses
    precision) is ever checked: true while no schema has either."""
    schema = registry.parsed_schema(name)
    found: list[tuple[int, Any]] = []
    _types(schema, schema["__named_schemas"], 0, found)
    assert not [t for depth, t in found if t == "timestamp-millis" and depth > 1]
    assert "float" not in [t for _, t in found]
    assert [t for depth, t in found if t == "timestamp-millis" and depth == 1]  # walker works


def _sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None
    return value


def test_the_worker_exports_its_codecs_reuse() -> None:
    codec = Codec(remember=8)
    track_codec(codec)
    reused, kept = (
        _sample("switchboard_codec_reused_total"),
        _sample("switchboard_codec_kept_records"),
    )
    data = codec.encode(event())
    assert _sample("switchboard_codec_kept_records") == kept + 1
    codec.decode(data, ConversationEvent)
    assert _sample("switchboard_codec_reused_total") == reused + 1
    assert _sample("switchboard_codec_kept_records") == kept
