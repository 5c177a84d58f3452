"""Sortable message ids and W3C traceparent handling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.ids import id_timestamp_ms, new_message_id, scoped_id
from processors.tracing import child_traceparent, new_traceparent, parse_traceparent
from schemas.models import Priority

_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(_times, st.timedeltas(min_value=timedelta(milliseconds=1), max_value=timedelta(days=999)))
def test_later_ids_sort_after_earlier_ids(first: datetime, gap: timedelta) -> None:
    assert new_message_id(first) < new_message_id(first + gap)


def test_within_one_millisecond_critical_sorts_before_low() -> None:
    now = datetime(2026, 11, 21, tzinfo=UTC)
    assert new_message_id(now, Priority.CRITICAL) < new_message_id(now, Priority.LOW)


@given(_times)
def test_id_encodes_its_creation_millisecond(moment: datetime) -> None:
    assert id_timestamp_ms(new_message_id(moment)) == int(moment.timestamp() * 1000)


def test_foreign_id_is_rejected_with_the_id_in_the_message() -> None:
    with pytest.raises(ValueError, match="abc"):
        id_timestamp_ms("abc")


def test_child_keeps_trace_id_and_flags_but_not_span_id() -> None:
    parent = new_traceparent()
    child = child_traceparent(parent.encode())
    p, c = parse_traceparent(parent), parse_traceparent(child)
    assert p is not None
    assert c is not None
    assert (c[0], c[2]) == (p[0], p[2])
    assert c[1] != p[1]


@pytest.mark.parametrize(
    "value",
    [
        None,
        "garbage",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    ],
)
def test_malformed_or_invalid_traceparent_starts_a_new_trace(value: str | None) -> None:
    assert parse_traceparent(value) is None
    assert parse_traceparent(child_traceparent(value)) is not None


def test_spec_example_traceparent_parses() -> None:
    example = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert parse_traceparent(example) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        "01",
    )


def test_scoped_id_is_stable_and_keeps_scope_parts_apart() -> None:
    assert scoped_id("m-1:reply", "acme", "c1") == scoped_id("m-1:reply", "acme", "c1")
    assert scoped_id("m-1:reply", "acme", "c1").startswith("m-1:reply@")
    assert len(scoped_id("m-1", "acme").rpartition("@")[2]) == 16
    assert scoped_id("m-1", "acme") != scoped_id("m-1", "globex")
    assert scoped_id("x", "a/b", "c") != scoped_id("x", "a", "b/c")
    assert scoped_id("x", "a:b", "c") != scoped_id("x", "a", "b:c")
