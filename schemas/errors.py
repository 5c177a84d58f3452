"""Errors of the schema package: one root, decode failures that say why, registry failures."""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "DecodeError",
    "DecodeErrorType",
    "EncodeError",
    "SchemaError",
    "SchemaRegistryError",
    "UnknownSchemaError",
]

DecodeErrorType = Literal["DecodeError", "ValidationError", "UnknownSchema", "EmptyRecord"]

_ERROR_TYPES: Final = frozenset({"DecodeError", "ValidationError", "UnknownSchema", "EmptyRecord"})


class SchemaError(Exception):
    """Root of every error raised by ``schemas`` (codec, registry, compatibility check)."""


class DecodeError(SchemaError):
    """Bytes could not be turned into a record model.

    A consumer dead-letters the record with ``reason`` and ``error_type`` (the ``DeadLetter``
    fields of the same names); retrying the same bytes gives the same error, except for
    :class:`UnknownSchemaError` when a Schema Registry can supply the writer schema.

    Attributes:
        reason: Precise, human-readable reason, e.g.
            ``"Confluent framing: unknown schema id 7"``.
        error_type: Machine-readable class: ``"DecodeError"`` (framing, truncated or trailing
            bytes, bad UTF-8 or JSON syntax), ``"ValidationError"`` (well-formed but breaks
            the contract), ``"UnknownSchema"`` (writer schema not known) or ``"EmptyRecord"``
            (zero bytes or a tombstone).
    """

    def __init__(self, reason: str, *, error_type: DecodeErrorType = "DecodeError") -> None:
        if error_type not in _ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}")
        super().__init__(reason)
        self.reason = reason
        self.error_type: DecodeErrorType = error_type


class UnknownSchemaError(DecodeError):
    """The writer schema named by the framing is not known to the codec.

    With Confluent framing, ``await codec.resolve(err.schema_id)`` fetches it from the Schema
    Registry; decoding the same bytes again then succeeds.

    Attributes:
        schema_id: Schema Registry id from the Confluent framing, else None.
        fingerprint: 8-byte CRC-64-AVRO fingerprint from single-object encoding, else None.
    """

    def __init__(
        self, reason: str, *, schema_id: int | None = None, fingerprint: bytes | None = None
    ) -> None:
        super().__init__(reason, error_type="UnknownSchema")
        self.schema_id = schema_id
        self.fingerprint = fingerprint


class EncodeError(SchemaError):
    """A record model could not be written with its Avro schema (e.g. an int out of range).

    Attributes:
        reason: Precise, human-readable reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaRegistryError(SchemaError):
    """A Confluent Schema Registry call failed.

    Attributes:
        status: HTTP status code, or None when no response came (connection error, timeout).
        error_code: The registry's ``error_code`` (e.g. 40403 schema not found), if given.
        message: The registry's ``message``, or a description of the transport failure.
        retriable: True for transport failures, 408, 429 and 5xx; the same call may succeed.
            A 2xx answer whose schema is unusable (not Avro, not a JSON object) is not
            retriable: asking again returns the same schema.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: int | None = None,
        retriable: bool | None = None,
    ) -> None:
        detail = f"schema registry: {message}"
        if status is not None:
            detail += f" (HTTP {status}"
            detail += f", error_code {error_code})" if error_code is not None else ")"
        super().__init__(detail)
        self.status = status
        self.error_code = error_code
        self.message = message
        if retriable is None:
            retriable = status is None or status in (408, 429) or status >= 500
        self.retriable = retriable
