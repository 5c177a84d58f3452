"""Random valid records of the bundled Avro schemas (hypothesis strategies)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from schemas import registry
from schemas.models import AvroRecord


def _ms(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def avro_strategy(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Random valid Avro datums (as model input) for a parsed schema."""
    if isinstance(schema, str) and schema in named:
        return avro_strategy(named[schema], named)
    if isinstance(schema, list):
        return st.one_of([avro_strategy(branch, named) for branch in schema])
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
        return st.datetimes(timezones=st.just(UTC)).map(_ms)
    simple: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(),
        "boolean": st.booleans(),
        "string": st.text(max_size=12),
        "bytes": st.binary(max_size=12),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(width=32, allow_nan=False),
        "double": st.floats(allow_nan=False),
    }
    if kind in simple:
        return simple[kind]
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(avro_strategy(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(
            st.text(max_size=6), avro_strategy(schema["values"], named), max_size=3
        )
    required = {
        f["name"]: avro_strategy(f["type"], named) for f in schema["fields"] if "default" not in f
    }
    optional = {
        f["name"]: avro_strategy(f["type"], named) for f in schema["fields"] if "default" in f
    }
    return st.fixed_dictionaries(required, optional=optional)


def records(name: str) -> st.SearchStrategy[AvroRecord]:
    schema = registry.parsed_schema(name)
    return avro_strategy(schema, schema["__named_schemas"]).map(
        registry.model_for(name).model_validate
    )
