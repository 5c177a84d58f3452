"""Record models ↔ bytes: Avro single-object or Confluent framing, and JSON on the inbound topic.

Framings (detected from the first bytes when decoding):

* Avro single-object encoding: ``0xC3 0x01`` + 8-byte little-endian CRC-64-AVRO fingerprint of
  the writer schema + Avro binary body (Avro 1.11.1 specification, "Single-object encoding").
  Written when no Schema Registry is configured.
* Confluent wire format: ``0x00`` + 4-byte big-endian schema id + Avro binary body
  (Confluent Schema Registry documentation, "Wire format"). Written with a Schema Registry.
* JSON (``decode_inbound`` only): a UTF-8 JSON object with the Avro record's fields, accepted
  exactly when the Avro record would be. Timestamps are ISO-8601 strings with a UTC offset
  (``"2024-05-01T12:00:00.250Z"``, ``"2024-05-01T14:00:00+02:00"``) or integer epoch
  milliseconds; both become aware UTC datetimes truncated to milliseconds.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import pydantic
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError as AvroValidationError
from fastavro.validation import validate

from schemas import registry as bundled
from schemas.compat import names_match
from schemas.errors import (
    DecodeError,
    EncodeError,
    SchemaError,
    SchemaRegistryError,
    UnknownSchemaError,
)
from schemas.models import AvroRecord, InboundMessage
from schemas.schema_registry_client import SchemaRegistry, subject_for

__all__ = ["SINGLE_OBJECT_MAGIC", "Codec", "avro_long_bytes"]

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=AvroRecord)

SINGLE_OBJECT_MAGIC: Final = b"\xc3\x01"
_JSON_WHITESPACE: Final = b" \t\r\n"
_JSON_STARTS: Final = frozenset(b'{["-0123456789tfn')
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


UNKNOWN_ID_RETRY_S: Final = 10.0
"""How long ``Codec.resolve_unknown`` trusts the registry's "unknown id" answer (s): long
enough that a stream of bad records costs one registry call per id every few seconds, short
enough that an id a lagging registry follower did not know yet is soon asked for again."""
UNKNOWN_IDS_MAX: Final = 10_000
"""Most unknown ids remembered at once; beyond, the expired ones are forgotten, then all."""
REMEMBER_BYTES: Final = 4 * 1024 * 1024
"""Default of ``Codec(remember_bytes=...)``: encoded bytes of the records kept for reuse."""
_MAX_SCHEMA_ID: Final = 2**31 - 1  # registry ids are Java ints: larger ones are not asked for
_REGISTRY_ACCESS_ERRORS: Final = frozenset({401, 403, 407, 408, 429})


def _answered_for_good(exc: SchemaRegistryError) -> bool:
    """Whether asking the registry again for the schema would get the same answer: a 4xx other
    than an access error (404 unknown id, 400, 422), or a schema that is not usable (not
    Avro, not a JSON object). Access errors (401, 403, 407), timeouts, 429 and 5xx are not."""
    if exc.status is None:
        return not exc.retriable
    return 400 <= exc.status < 500 and exc.status not in _REGISTRY_ACCESS_ERRORS


def avro_long_bytes(value: int) -> int:
    """Bytes of ``value`` as an Avro ``long``: zig-zag, then a base-128 varint (Avro 1.11
    specification, "Binary Encoding")."""
    zigzag = (value << 1) ^ (value >> 63)
    return max(1, (zigzag.bit_length() + 6) // 7)


class Codec:
    """Encodes and decodes the record models with their bundled Avro schemas.

    Schemas are parsed once per process; ``encode`` and ``decode`` only look up dicts.

    Args:
        registry: Confluent Schema Registry (``SchemaRegistryClient`` or a test double). With
            one, ``encode`` writes the Confluent framing and ``await start()`` must run first;
            without, it writes single-object encoding. ``decode`` reads both framings either
            way. The codec owns the registry and closes it in ``aclose``.
        remember: How many of the records this codec encoded most recently to keep, by their
            bytes (0 = none). Decoding bytes it still keeps returns the very record that was
            encoded, once, without decoding: a worker consumes most of the records its own
            stages produced, and decoding one costs ~10 µs. This is exact, not a shortcut:
            the bytes name their writer schema, so decoding is a function of the bytes, and
            only records that decode back to an equal record are kept (every timestamp a
            whole millisecond in UTC; other values survive Avro unchanged). The records are
            frozen models; what they hold must not be changed in place, and a record made
            with ``model_copy(update=...)`` (which pydantic does not validate) must be given
            values of the fields' own types (the stages do both). Oldest first out; a kept
            record that is never consumed here (another worker owns its partition) just
            waits its turn.
        remember_types: Only records of these models are kept (None: all). A worker passes
            the ones its stages consume, so dead letters, reports and analytics records,
            which no stage of it reads, take no room.
        remember_bytes: Most bytes of encoded records kept at once (the records themselves
            take about as much again); the oldest go first. A record larger than a quarter of
            it is not kept.
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        *,
        remember: int = 0,
        remember_types: Iterable[type[AvroRecord]] | None = None,
        remember_bytes: int = REMEMBER_BYTES,
    ) -> None:
        self._registry = registry
        self._remember = remember
        self._remember_names = (
            None if remember_types is None else frozenset(t.avro_name for t in remember_types)
        )
        self._remember_bytes = remember_bytes
        self._recent: dict[bytes, AvroRecord] = {}
        """Bytes → the record they were encoded from, oldest first (``remember``)."""
        self._recent_bytes = 0
        """Sum of the lengths of ``_recent``'s keys."""
        self.reused = 0
        """Decodes answered from ``remember``ed records since the codec was made."""
        names = bundled.schema_names()
        self._parsed = {n: bundled.parsed_schema(n) for n in names}
        self._by_fingerprint = {bundled.fingerprint(n): self._parsed[n] for n in names}
        self._by_id: dict[int, dict[str, Any]] = {}
        self._unknown: dict[int, tuple[float, str]] = {}
        """Schema id → (monotonic time (s) before which ``resolve_unknown`` won't ask again,
        the registry's answer), for the decode error of records written with it."""
        self._headers: dict[str, bytes] = {}
        if registry is None:
            self._headers = {n: SINGLE_OBJECT_MAGIC + bundled.fingerprint(n) for n in names}
        self._timestamps = {n: _timestamp_fields(self._parsed[n]) for n in names}

    async def start(self) -> None:
        """Register every bundled schema with the Schema Registry (if any) and cache the ids.

        Subjects follow RecordNameStrategy (subject = full record name).

        Raises:
            SchemaRegistryError: The registry refused a schema or could not be reached.
        """
        if self._registry is None:
            return
        for name in self._parsed:
            raw = json.dumps(bundled.raw_schema(name))
            schema_id = await self._registry.register(subject_for(name), raw)
            self._by_id[schema_id] = self._parsed[name]
            self._headers[name] = b"\x00" + schema_id.to_bytes(4, "big")
            logger.info("schema %s registered as id %d", name, schema_id)

    async def resolve(self, schema_id: int) -> str:
        """Fetch an unknown writer schema by id from the Schema Registry and cache it.

        After ``UnknownSchemaError(schema_id=N)``, ``await codec.resolve(N)`` then decoding
        the same bytes again reads them with that writer schema.

        Returns:
            The full name of the fetched record schema.

        Raises:
            UnknownSchemaError: The registry does not know the id (404) or refuses it (another
                4xx than 401, 403, 407, 408 and 429), or its schema is not Avro or not a valid
                Avro record schema: the record cannot be decoded (dead-letter it).
            SchemaRegistryError: The registry could not be reached or failed (``retriable``),
                or refused the call (e.g. 401/403: wrong credentials, not retriable).
            SchemaError: No registry configured.
        """
        if schema_id not in self._by_id:
            if self._registry is None:
                raise SchemaError(f"cannot resolve schema id {schema_id}: no schema registry")
            try:
                schema = await self._registry.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if not _answered_for_good(exc):
                    raise
                what = (
                    "unknown to the schema registry"
                    if exc.status == 404
                    else f"not usable: {exc.message}"
                    + (f" (HTTP {exc.status})" if exc.status is not None else "")
                )
                raise UnknownSchemaError(
                    f"Confluent framing: schema id {schema_id} {what}", schema_id=schema_id
                ) from exc
            try:
                self._by_id[schema_id] = self.add_writer_schema(schema)
            except SchemaError as exc:
                raise UnknownSchemaError(
                    f"Confluent framing: schema id {schema_id} is unusable: {exc}",
                    schema_id=schema_id,
                ) from exc
        return str(self._by_id[schema_id]["name"])

    async def resolve_unknown(self, values: Iterable[bytes | None]) -> set[int]:
        """Fetch the writer schemas of every Confluent-framed value whose schema id is unknown.

        Called on each batch before its records are decoded (``BatchConsumer.prepare``), so
        every stage reads records written with schemas it has not seen yet, e.g. by a newer
        producer during a rolling upgrade. Ids the registry cannot supply are left unknown:
        decoding those records raises :class:`UnknownSchemaError` and the stage dead-letters
        them. An id the registry could not supply is asked for again only after
        ``UNKNOWN_ID_RETRY_S``, so a stream of such records costs no call per batch; an id
        above 2**31 - 1 (registry ids are Java ints) is never asked for. Does nothing
        without a registry.

        Args:
            values: Kafka record values; other framings and tombstones are skipped.

        Returns:
            The schema ids that were unknown and stay unknown (404 or unusable schema).

        Raises:
            SchemaRegistryError: The registry could not be reached or failed (``retriable``:
                the batch is retried), or refused the call (not retriable).
        """
        if self._registry is None:
            return set()
        wanted = {
            int.from_bytes(value[1:5], "big")
            for value in values
            if value and len(value) >= 5 and value[0] == 0x00
        }
        missing: set[int] = set()
        now = time.monotonic()
        if len(self._unknown) > UNKNOWN_IDS_MAX:
            self._unknown = {i: u for i, u in self._unknown.items() if u[0] > now}
            if len(self._unknown) > UNKNOWN_IDS_MAX:
                self._unknown.clear()
        for schema_id in sorted(wanted - self._by_id.keys()):
            if schema_id > _MAX_SCHEMA_ID:
                missing.add(schema_id)
                continue
            if schema_id in self._unknown and self._unknown[schema_id][0] > now:
                missing.add(schema_id)
                continue
            try:
                await self.resolve(schema_id)
            except UnknownSchemaError as exc:
                logger.warning("%s; records written with it are dead-lettered", exc.reason)
                missing.add(schema_id)
                self._unknown[schema_id] = (now + UNKNOWN_ID_RETRY_S, exc.reason)
        return missing

    def add_writer_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Make a writer schema (e.g. an older version) readable in single-object encoding.

        Returns:
            The parsed schema; a bundled schema with the same fingerprint is reused.

        Raises:
            SchemaError: ``schema`` is not a valid Avro record schema.
        """
        try:
            fp = bundled.schema_fingerprint(schema)
            parsed = self._by_fingerprint.get(fp) or parse_schema(schema, named_schemas={})
        except Exception as exc:  # SchemaParseException, UnknownType, KeyError, ...
            raise SchemaError(f"invalid writer schema: {type(exc).__name__}: {exc}") from exc
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise SchemaError("writer schema is not an Avro record schema")
        return self._by_fingerprint.setdefault(fp, parsed)

    async def aclose(self) -> None:
        """Close the Schema Registry client, if any."""
        if self._registry is not None:
            await self._registry.aclose()

    def encode(self, record: AvroRecord) -> bytes:
        """Return the framed Avro bytes of ``record`` (see the module docstring for framings).

        Raises:
            SchemaError: Registry mode and ``start()`` has not run, or no bundled schema.
            EncodeError: A value does not fit its Avro type (e.g. an int out of range).
        """
        name = record.avro_name
        header = self._headers.get(name)
        if header is None:
            if name in self._parsed:
                raise SchemaError("codec not started: await Codec.start() before encode")
            raise SchemaError(f"{type(record).__name__} has no bundled top-level schema")
        buffer = io.BytesIO()
        buffer.write(header)
        try:
            schemaless_writer(buffer, self._parsed[name], record.to_avro())
        except Exception as exc:  # fastavro raises ValueError, TypeError, OverflowError, ...
            raise EncodeError(f"cannot encode {name}: {type(exc).__name__}: {exc}") from exc
        data = buffer.getvalue()
        if (
            self._remember
            and (self._remember_names is None or name in self._remember_names)
            and len(data) <= self._remember_bytes // 4
            and _round_trips(record, self._timestamps[name])
        ):
            self._keep(data, record)
        return data

    def _keep(self, data: bytes, record: AvroRecord) -> None:
        recent = self._recent
        if data in recent:
            self._recent_bytes -= len(data)
            del recent[data]  # put back as the newest
        recent[data] = record
        self._recent_bytes += len(data)
        while len(recent) > self._remember or self._recent_bytes > self._remember_bytes:
            oldest = next(iter(recent))
            del recent[oldest]
            self._recent_bytes -= len(oldest)

    @property
    def remembered(self) -> int:
        """Records kept for ``decode`` now (at most ``remember``)."""
        return len(self._recent)

    def decode(self, data: bytes | None, model: type[R]) -> R:
        """Decode single-object or Confluent framed Avro bytes into ``model``.

        The writer schema named by the framing is resolved against the model's schema as
        reader schema (Avro specification, "Schema Resolution").

        Args:
            data: The Kafka record value; None (tombstone) counts as empty.
            model: The record model expected, e.g. ``InboundMessage``.

        Raises:
            DecodeError: Empty, unknown framing, truncated, trailing bytes, writer record not
                resolvable to the model's record, or a datum the model rejects.
            UnknownSchemaError: Writer fingerprint or schema id not known (yet).
            SchemaError: ``model`` has no bundled top-level schema (a programming error).
        """
        if not data:
            raise DecodeError("empty record (zero bytes or tombstone)", error_type="EmptyRecord")
        return self._decode_avro(data, model, "not Avro")

    def decode_inbound(self, data: bytes | None) -> InboundMessage:
        """Decode an inbound record: framed Avro as :meth:`decode`, or a UTF-8 JSON object.

        JSON is parsed, checked to be an object, validated with the pydantic model (unknown
        fields rejected) and then with ``fastavro.validation.validate`` against the Avro schema,
        and finally encoded once, so JSON and Avro accept exactly the same records.

        Raises:
            DecodeError: As :meth:`decode`; for JSON also invalid UTF-8 (with byte position),
                invalid JSON (line and column), a non-object, or ``error_type
                "ValidationError"`` listing each failing field as ``"field.path: message"``.
            UnknownSchemaError: Writer fingerprint or schema id not known (yet).
        """
        if not data:
            raise DecodeError("empty record (zero bytes or tombstone)", error_type="EmptyRecord")
        if data[0] in (0xC3, 0x00):
            return self._decode_avro(data, InboundMessage, "not Avro or JSON")
        start = len(data) - len(data.lstrip(_JSON_WHITESPACE))
        if start == len(data):
            raise DecodeError("empty record (only whitespace)", error_type="EmptyRecord")
        if data[start] not in _JSON_STARTS:
            at = f" at offset {start}" if start else ""
            raise DecodeError(f"not Avro or JSON: first byte 0x{data[start]:02x}{at}")
        return self._decode_json(data, InboundMessage)

    def decode_any(self, data: bytes | None) -> AvroRecord:
        """Decode framed Avro bytes into the bundled model named by the writer schema.

        For topics that carry several record types; the caller checks which one it got.

        Raises:
            DecodeError: As :meth:`decode`, and when the writer record (by name or alias) is
                none of the bundled ones.
            UnknownSchemaError: Writer fingerprint or schema id not known (yet).
        """
        if not data:
            raise DecodeError("empty record (zero bytes or tombstone)", error_type="EmptyRecord")
        writer, _, label = self._writer(data, "not Avro")
        model = bundled.MODELS.get(writer["name"])
        if model is None:  # a renamed writer type that a bundled schema lists as an alias
            aliased = [
                n for n, reader in self._parsed.items() if names_match(writer["name"], reader)
            ]
            if not aliased:
                raise DecodeError(
                    f"writer schema {writer['name']} ({label}) is not a bundled record"
                )
            model = bundled.MODELS[aliased[0]]
        return self._decode_avro(data, model, "not Avro")

    def _writer(self, data: bytes, not_avro: str) -> tuple[dict[str, Any], int, str]:
        """Return the writer schema named by the framing, the body offset and a label."""
        if data[0] == 0xC3:
            if len(data) < 2 or data[1] != 0x01:
                raise DecodeError(
                    f"single-object encoding: wrong magic bytes {data[:2].hex(' ')} "
                    "(expected c3 01)"
                )
            if len(data) < 10:
                raise DecodeError(
                    f"single-object encoding: header is {len(data)} bytes, expected 10"
                )
            writer = self._by_fingerprint.get(data[2:10])
            if writer is None:
                raise UnknownSchemaError(
                    f"single-object encoding: unknown schema fingerprint 0x{data[2:10].hex()}",
                    fingerprint=data[2:10],
                )
            return writer, 10, f"fingerprint 0x{data[2:10].hex()}"
        if data[0] == 0x00:
            if len(data) < 5:
                raise DecodeError(f"Confluent framing: header is {len(data)} bytes, expected 5")
            schema_id = int.from_bytes(data[1:5], "big")
            writer = self._by_id.get(schema_id)
            if writer is None:
                known = self._unknown.get(schema_id)
                if known is not None:  # the registry was asked: say what it answered
                    raise UnknownSchemaError(known[1], schema_id=schema_id)
                if schema_id > _MAX_SCHEMA_ID:
                    raise UnknownSchemaError(
                        f"Confluent framing: schema id {schema_id} is beyond the registry's "
                        f"id range (at most {_MAX_SCHEMA_ID})",
                        schema_id=schema_id,
                    )
                raise UnknownSchemaError(
                    f"Confluent framing: unknown schema id {schema_id}", schema_id=schema_id
                )
            return writer, 5, f"schema id {schema_id}"
        raise DecodeError(f"{not_avro}: first byte 0x{data[0]:02x}")

    def _decode_avro(self, data: bytes, model: type[R], not_avro: str) -> R:
        if self._recent and type(data) is bytes:
            kept = self._recent.pop(data, None)
            if kept is not None:
                self._recent_bytes -= len(data)
            if type(kept) is model:
                self.reused += 1
                return kept  # type(kept) is model: an R
        reader = self._parsed.get(model.avro_name)
        if reader is None:
            raise SchemaError(f"{model.__name__} has no bundled top-level schema")
        writer, offset, label = self._writer(data, not_avro)
        name = reader["name"]
        if writer is not reader and not names_match(writer["name"], reader):
            raise DecodeError(
                f"writer schema {writer['name']} ({label}) does not resolve to reader {name}"
            )
        buffer = io.BytesIO(data)
        buffer.seek(offset)
        try:
            datum = schemaless_reader(buffer, writer, None if writer is reader else reader)
        except (EOFError, IndexError) as exc:
            # The compiled reader raises IndexError("string index out of range") when a varint
            # runs past the end; other IndexErrors are enum or union indexes out of range.
            if isinstance(exc, EOFError) or "string index" in str(exc):
                detail = str(exc) if isinstance(exc, EOFError) and str(exc) else "no more bytes"
                raise DecodeError(
                    f"truncated Avro body for {name}: {detail} (data ends at byte {len(data)})"
                ) from exc
            raise DecodeError(
                f"invalid Avro body for {name} ({label}): enum symbol or union branch index "
                f"out of range ({exc})"
            ) from exc
        except Exception as exc:  # SchemaResolutionError, UnicodeDecodeError, IndexError, ...
            detail = f"{type(exc).__name__}: {exc}"[:300]
            raise DecodeError(f"invalid Avro body for {name} ({label}): {detail}") from exc
        if buffer.tell() != len(data):
            raise DecodeError(
                f"{len(data) - buffer.tell()} trailing bytes after the {name} datum "
                f"(datum ends at byte {buffer.tell()} of {len(data)})"
            )
        try:
            return model.model_validate(datum)
        except pydantic.ValidationError as exc:
            raise DecodeError(
                f"Avro datum does not fit {model.__name__}: " + "; ".join(_pydantic_reasons(exc)),
                error_type="ValidationError",
            ) from exc

    def _decode_json(self, data: bytes, model: type[R]) -> R:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in JSON at byte {exc.start}") from exc
        try:
            obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise DecodeError(
                f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from exc
        except RecursionError as exc:
            raise DecodeError("invalid JSON: nested too deeply") from exc
        except ValueError as exc:  # duplicate key, NaN/Infinity, integer with too many digits
            raise DecodeError(f"invalid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise DecodeError(
                f"JSON value is {_json_kind(obj)}, expected an object", error_type="ValidationError"
            )
        reasons = _convert_timestamps(obj, self._timestamps[model.avro_name])
        try:
            record = model.model_validate(obj)
        except pydantic.ValidationError as exc:
            raise _invalid_json(reasons + _pydantic_reasons(exc, skip=reasons)) from exc
        if reasons:
            raise _invalid_json(reasons)
        schema = self._parsed[model.avro_name]
        try:  # the JSON values themselves, not pydantic's coercions, must fit the Avro types
            validate({**record.to_avro(), **obj}, schema, raise_errors=True)
            schemaless_writer(io.BytesIO(), schema, record.to_avro())
        except AvroValidationError as exc:
            raise _invalid_json([_avro_reason(exc)]) from exc
        except Exception as exc:  # e.g. a lone surrogate from a "\\ud800" escape
            raise _invalid_json([f"not Avro-encodable: {type(exc).__name__}: {exc}"]) from exc
        return record


def _invalid_json(reasons: list[str]) -> DecodeError:
    return DecodeError(
        "JSON validation failed: " + "; ".join(reasons), error_type="ValidationError"
    )


def _round_trips(record: AvroRecord, timestamps: frozenset[str]) -> bool:
    """Whether decoding ``record``'s Avro bytes gives back an equal record: every timestamp
    (``timestamp-millis`` keeps whole milliseconds and decodes to UTC) is a whole
    millisecond with UTC as its zone. Top-level fields only; ``test_codec_reuse`` checks that
    no bundled schema has a timestamp deeper down."""
    for name in timestamps:
        value = getattr(record, name)
        if value is not None and (value.tzinfo is not UTC or value.microsecond % 1000):
            return False
    return True


def _timestamp_fields(schema: dict[str, Any]) -> frozenset[str]:
    def is_ts(t: Any) -> bool:
        if isinstance(t, list):
            return any(is_ts(b) for b in t)
        return isinstance(t, dict) and t.get("logicalType") == "timestamp-millis"

    return frozenset(f["name"] for f in schema["fields"] if is_ts(f["type"]))


def _convert_timestamps(obj: dict[str, Any], fields: frozenset[str]) -> list[str]:
    """Replace JSON timestamps in ``obj`` by aware UTC datetimes; return ``"field: why"`` list."""
    reasons = []
    for name in fields & obj.keys():
        if obj[name] is not None:  # null: the model says whether the field may be null
            try:
                obj[name] = _json_timestamp(obj[name])
            except ValueError as exc:
                reasons.append(f"{name}: {exc}")
    return reasons


def _json_timestamp(value: object) -> datetime:
    try:
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
            if parsed.tzinfo is None:
                raise ValueError(f"ISO-8601 timestamp {value!r} has no UTC offset (add Z)")
        elif isinstance(value, int) and not isinstance(value, bool):
            parsed = _EPOCH + timedelta(milliseconds=value)
        else:
            raise ValueError(
                "expected an ISO-8601 string or integer epoch milliseconds, "
                f"got {_json_kind(value)}"
            )
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"timestamp out of range: {value!r}") from None
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    kinds = {list: "an array", dict: "an object", str: "a string", type(None): "null"}
    return kinds.get(type(value), "a number")


def _loc(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _pydantic_reasons(exc: pydantic.ValidationError, skip: Sequence[str] = ()) -> list[str]:
    """Return ``"field.path: message"`` per error, leaving out fields already in ``skip``."""
    skipped = {reason.split(":", 1)[0] for reason in skip}
    return [
        f"{_loc(e['loc'])}: {e['msg']}"
        for e in exc.errors(include_url=False)
        if not e["loc"] or str(e["loc"][0]) not in skipped
    ]


def _avro_reason(exc: AvroValidationError) -> str:
    """``"field: Avro type null | long does not accept True (bool)"`` from the first bad field."""
    first = exc.errors[0]
    expected = " | ".join(
        str(e.schema.get("name", e.schema.get("type")))
        if isinstance(e.schema, dict)
        else str(e.schema)
        for e in exc.errors
        if e.field == first.field
    )
    datum = first.datum
    field = str(first.field).rsplit(".", 1)[-1]
    return f"{field}: Avro type {expected} does not accept {datum!r} ({type(datum).__name__})"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
