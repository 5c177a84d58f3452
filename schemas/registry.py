"""The bundled Avro schemas (``schemas/avro/*.avsc``), parsed once, with models and fingerprints."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib.resources import files
from typing import Any, Final

from fastavro import parse_schema
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from schemas import models
from schemas.models import AvroRecord

__all__ = [
    "MODELS",
    "NAMESPACE",
    "canonical_form",
    "fingerprint",
    "full_name",
    "model_for",
    "parsed_schema",
    "raw_schema",
    "schema_fingerprint",
    "schema_names",
]

NAMESPACE: Final = "switchboard"

MODELS: Final[dict[str, type[AvroRecord]]] = {
    cls.avro_name: cls
    for cls in (
        models.InboundMessage,
        models.ConversationEvent,
        models.LLMRequest,
        models.LLMResponse,
        models.DeliveryRequest,
        models.DeliveryReport,
        models.DeadLetter,
        models.ConversationSummary,
    )
}
"""Full record name (``"switchboard.InboundMessage"``) → model, one per bundled ``.avsc``."""


def full_name(name: str) -> str:
    """Return the full name of a bundled record (``"InboundMessage"`` → ``"switchboard.…"``).

    Raises:
        KeyError: No bundled schema has that name.
    """
    qualified = name if "." in name else f"{NAMESPACE}.{name}"
    if qualified not in MODELS:
        raise KeyError(f"no bundled Avro schema named {name!r}")
    return qualified


def schema_names() -> tuple[str, ...]:
    """Return the full names of all bundled schemas, in a stable (sorted) order."""
    return tuple(sorted(MODELS))


@cache
def _load_raw(qualified: str) -> dict[str, Any]:
    short = qualified.rsplit(".", 1)[1]
    text = files("schemas").joinpath("avro", f"{short}.avsc").read_text(encoding="utf-8")
    raw: dict[str, Any] = json.loads(text)
    found = f"{raw.get('namespace', '')}.{raw.get('name', '')}"
    if found != qualified:
        raise ValueError(f"schemas/avro/{short}.avsc defines {found}, expected {qualified}")
    return raw


def raw_schema(name: str) -> dict[str, Any]:
    """Return a deep copy of a bundled schema as written in its ``.avsc`` file.

    Args:
        name: Full (``"switchboard.InboundMessage"``) or short (``"InboundMessage"``) name.

    Raises:
        KeyError: No bundled schema has that name.
    """
    return copy.deepcopy(_load_raw(full_name(name)))


@cache
def _parsed(qualified: str) -> dict[str, Any]:
    # Each file repeats its enum definitions, so each gets its own named-types dict.
    parsed = parse_schema(_load_raw(qualified), named_schemas={})
    if not isinstance(parsed, dict):
        raise ValueError(f"{qualified} is not a record schema")
    return parsed


def parsed_schema(name: str) -> dict[str, Any]:
    """Return the ``fastavro.parse_schema`` result of a bundled schema, parsed once per process.

    The returned dict is shared: do not mutate it.

    Raises:
        KeyError: No bundled schema has that name.
    """
    return _parsed(full_name(name))


def canonical_form(name: str) -> str:
    """Return the Parsing Canonical Form of a bundled schema.

    Source: Avro 1.11.1 specification, "Parsing Canonical Form for Schemas".

    Raises:
        KeyError: No bundled schema has that name.
    """
    return _canonical(full_name(name))


@cache
def _canonical(qualified: str) -> str:
    form: str = to_parsing_canonical_form(_load_raw(qualified))
    return form


def schema_fingerprint(schema: dict[str, Any] | list[Any] | str) -> bytes:
    """Return the 8-byte CRC-64-AVRO fingerprint of any schema's Parsing Canonical Form.

    Bytes are little-endian, as written after ``0xC3 0x01`` in single-object encoding
    (Avro 1.11.1 specification, "Schema Fingerprints" and "Single-object encoding").

    Raises:
        fastavro.schema.SchemaParseException: ``schema`` is not a valid Avro schema.
    """
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@cache
def _fingerprint(qualified: str) -> bytes:
    return schema_fingerprint(_load_raw(qualified))


def fingerprint(name: str) -> bytes:
    """Return the 8-byte little-endian CRC-64-AVRO fingerprint of a bundled schema.

    Raises:
        KeyError: No bundled schema has that name.
    """
    return _fingerprint(full_name(name))


def model_for(name: str) -> type[AvroRecord]:
    """Return the pydantic model of a bundled schema (full or short name).

    Raises:
        KeyError: No bundled schema has that name.
    """
    return MODELS[full_name(name)]
