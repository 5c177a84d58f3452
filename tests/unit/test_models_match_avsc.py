"""The hand-written pydantic models in schemas/models.py match the .avsc files field by field."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo

from schemas import models

AVRO_DIR = Path(models.__file__).parent / "avro"
PRIMITIVE_TYPES: dict[str, object] = {
    "string": str,
    "int": int,
    "long": int,
    "float": float,
    "double": float,
    "bytes": bytes,
    "boolean": bool,
}


def _walk(schema: Any, found: dict[str, dict[str, Any]], file: str) -> None:
    """Collect every named record and enum definition of one file (nested ones included)."""
    if isinstance(schema, list):
        for branch in schema:
            _walk(branch, found, file)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            found.setdefault(schema["name"], {**schema, "__file__": file})
        for field in schema.get("fields", []):
            _walk(field["type"], found, file)
        for key in ("items", "values"):
            if key in schema:
                _walk(schema[key], found, file)


def _definitions() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(AVRO_DIR.glob("*.avsc")):
        _walk(json.loads(path.read_text()), found, path.name)
    return found


DEFINITIONS = _definitions()
RECORDS = sorted(n for n, d in DEFINITIONS.items() if d["type"] == "record")
ENUMS = sorted(n for n, d in DEFINITIONS.items() if d["type"] == "enum")


def _model(name: str) -> type[models.AvroRecord]:
    model = getattr(models, name, None)
    assert model is not None, f"no model class {name} in schemas/models.py"
    assert isinstance(model, type)
    assert issubclass(model, models.AvroRecord), f"{name} does not subclass AvroRecord"
    return model


def _expected_annotation(avro_type: Any) -> object:
    """The Python annotation a model field must have for an Avro field type."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        assert len(branches) == 1, f"only ['null', X] unions are modelled, got {avro_type}"
        inner = _expected_annotation(branches[0])
        return inner | None if "null" in avro_type else inner  # type: ignore[operator]
    if isinstance(avro_type, str):
        if avro_type in PRIMITIVE_TYPES:
            return PRIMITIVE_TYPES[avro_type]
        return _expected_annotation({"type": "named", "name": avro_type})
    if avro_type.get("logicalType") == "timestamp-millis":
        return datetime
    kind = avro_type["type"]
    if kind in PRIMITIVE_TYPES:
        return PRIMITIVE_TYPES[kind]
    if kind == "array":
        return list[_expected_annotation(avro_type["items"])]  # type: ignore[misc]
    if kind == "map":
        return dict[str, _expected_annotation(avro_type["values"])]  # type: ignore[misc]
    return getattr(models, avro_type["name"].rsplit(".", 1)[-1])


def _fields(name: str) -> tuple[list[dict[str, Any]], dict[str, FieldInfo]]:
    return DEFINITIONS[name]["fields"], _model(name).model_fields


def test_every_avsc_file_defines_the_record_it_is_named_after() -> None:
    for path in AVRO_DIR.glob("*.avsc"):
        schema = json.loads(path.read_text())
        assert (schema["namespace"], schema["name"]) == ("switchboard", path.stem), path.name


def test_every_record_model_has_a_schema_and_every_schema_a_model() -> None:
    modelled = {
        cls.__name__
        for cls in vars(models).values()
        if isinstance(cls, type)
        and issubclass(cls, models.AvroRecord)
        and cls is not models.AvroRecord
    }
    assert modelled == set(RECORDS), (
        f"models without schema: {sorted(modelled - set(RECORDS))}; "
        f"schemas without model: {sorted(set(RECORDS) - modelled)}"
    )
    assert {"ChatMessage", "Header"} <= set(RECORDS)


@pytest.mark.parametrize("name", RECORDS)
def test_model_avro_name_is_the_full_record_name(name: str) -> None:
    assert _model(name).avro_name == f"switchboard.{name}"


@pytest.mark.parametrize("name", RECORDS)
def test_model_has_exactly_the_avro_fields_in_order(name: str) -> None:
    avro_fields, model_fields = _fields(name)
    avro_names = [f["name"] for f in avro_fields]
    missing = [n for n in avro_names if n not in model_fields]
    extra = [n for n in model_fields if n not in avro_names]
    assert not missing, f"{name}: fields in the .avsc but not in the model: {missing}"
    assert not extra, f"{name}: fields in the model but not in the .avsc: {extra}"
    assert list(model_fields) == avro_names, f"{name}: field order differs"


@pytest.mark.parametrize("name", RECORDS)
def test_model_field_is_required_exactly_when_avro_field_has_no_default(name: str) -> None:
    avro_fields, model_fields = _fields(name)
    for field in avro_fields:
        avro_required = "default" not in field
        assert model_fields[field["name"]].is_required() == avro_required, (
            f"{name}.{field['name']}: Avro {'has no' if avro_required else 'has a'} default but "
            f"the model field is {'not ' if avro_required else ''}required"
        )


@pytest.mark.parametrize("name", RECORDS)
def test_model_defaults_equal_avro_defaults(name: str) -> None:
    avro_fields, model_fields = _fields(name)
    for field in avro_fields:
        if "default" in field:
            model_default = model_fields[field["name"]].get_default(call_default_factory=True)
            assert model_default == field["default"], (
                f"{name}.{field['name']}: model default {model_default!r} != Avro default "
                f"{field['default']!r}"
            )
            if _is_enum(field["type"]):
                assert isinstance(model_default, StrEnum), (
                    f"{name}.{field['name']}: default of an enum field must be an enum member"
                )


def _is_enum(avro_type: Any) -> bool:
    if isinstance(avro_type, str):
        return DEFINITIONS.get(avro_type.rsplit(".", 1)[-1], {}).get("type") == "enum"
    return isinstance(avro_type, dict) and avro_type.get("type") == "enum"


@pytest.mark.parametrize("name", RECORDS)
def test_model_field_types_match_avro_types_including_nullability(name: str) -> None:
    avro_fields, model_fields = _fields(name)
    for field in avro_fields:
        expected = _expected_annotation(field["type"])
        actual = model_fields[field["name"]].annotation
        nullable = isinstance(field["type"], list) and "null" in field["type"]
        assert (type(None) in getattr(actual, "__args__", ())) == nullable, (
            f"{name}.{field['name']}: Avro {'is' if nullable else 'is not'} a null union but the "
            f"model annotation is {actual}"
        )
        assert actual == expected, f"{name}.{field['name']}: model type {actual} != {expected}"


@pytest.mark.parametrize("name", ENUMS)
def test_enum_symbols_equal_strenum_values_in_order(name: str) -> None:
    enum = getattr(models, name, None)
    assert isinstance(enum, type), f"no StrEnum {name} in schemas/models.py"
    assert issubclass(enum, StrEnum), f"{name} is not a StrEnum"
    assert [m.value for m in enum] == DEFINITIONS[name]["symbols"], f"{name}: symbols differ"


def test_enum_definitions_repeated_across_files_are_identical() -> None:
    by_name: dict[str, set[str]] = {}
    for path in AVRO_DIR.glob("*.avsc"):
        found: dict[str, dict[str, Any]] = {}
        _walk(json.loads(path.read_text()), found, path.name)
        for enum_name, definition in found.items():
            if definition["type"] == "enum":
                definition.pop("__file__")
                by_name.setdefault(enum_name, set()).add(json.dumps(definition, sort_keys=True))
    drifted = {n: sorted(v) for n, v in by_name.items() if len(v) > 1}
    assert not drifted, f"enum definitions differ between files: {drifted}"


def test_utcnow_is_aware_utc_whole_milliseconds_and_now() -> None:
    before = time.time()
    stamps = [models.utcnow() for _ in range(2000)]
    after = time.time()
    for stamp in stamps:
        assert stamp.tzinfo is UTC
        assert stamp.microsecond % 1000 == 0
        assert before - 0.001 <= stamp.timestamp() <= after
    assert stamps == sorted(stamps)
