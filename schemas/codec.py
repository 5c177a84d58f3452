"""Record models ↔ bytes: Avro single-object or Confluent framing, and JSON on the inbound topic.

Framings (detected from the first bytes when decoding):

* Avro single-object encoding, ``0xC3 0x01`` + 8-byte little-endian CRC-64-AVRO fingerprint of
  the writer schema + Avro binary body (Avro 1.11.1 specification, "Single-object encoding").
  Written when no Schema Registry is configured.
* Confluent wire format, ``0x00`` + 4-byte big-endian schema id + Avro binary body
  (Confluent "Wire format" documentation). Written when a Schema Registry is configured.
* JSON (``decode_inbound`` only): a UTF-8 JSON object holding the same fields as the Avro
  record, accepted exactly when the Avro record would be. Timestamp fields are ISO-8601 strings
  with a UTC offset (``"2024-05-01T12:00:00.250Z"``, ``"…+02:00"``) or integer epoch
  milliseconds; both are stored as aware UTC datetimes truncated to milliseconds.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Final, TypeVar

import pydantic
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError as AvroValidationError
from fastavro.validation import validate

from schemas import registry
from schemas.compat import names_match
from schemas.errors import DecodeError, EncodeError, SchemaError, UnknownSchemaError
from schemas.json_fields import json_timestamp, pydantic_reasons
from schemas.models import AvroRecord, InboundMessage
from schemas.schema_registry_client import SchemaRegistry, subject_for

__all__ = ["Codec"]

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=AvroRecord)

SINGLE_OBJECT_MAGIC: Final = b"\xc3\x01"
_JSON_WHITESPACE: Final = b" \t\r\n"
_JSON_STARTS: Final = frozenset(b'{["-0123456789tfn')


class Codec:
    """Encodes and decodes the record models with their bundled Avro schemas.

    Schemas are parsed once per process; ``encode`` and ``decode`` only look up dicts.

    Args:
        registry: Confluent Schema Registry (``SchemaRegistryClient`` or a test double). With
            one, ``encode`` writes the Confluent framing and ``await start()`` must run first;
            without, it writes single-object encoding. ``decode`` reads both framings either
            way. The codec owns the registry and closes it in ``aclose``.
    """

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self._registry = registry
        names = registry_names = registry_module_names()
        self._parsed: dict[str, dict[str, Any]] = {n: parsed_for(n) for n in names}
        self._by_fingerprint = {registry_fp(n): self._parsed[n] for n in names}
        self._by_id: dict[int, dict[str, Any]] = {}
        self._headers: dict[str, bytes] = {}
        if registry is None:
            self._headers = {n: SINGLE_OBJECT_MAGIC + registry_fp(n) for n in registry_names}
