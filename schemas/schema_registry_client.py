"""Confluent Schema Registry: the two calls the codec needs, over HTTP and in memory."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Final, Protocol
from urllib.parse import quote

import httpx

from schemas.errors import SchemaRegistryError

__all__ = [
    "CONTENT_TYPE",
    "InMemorySchemaRegistry",
    "SchemaRegistry",
    "SchemaRegistryClient",
    "subject_for",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"
_ACCEPT: Final = (
    f"{CONTENT_TYPE}, application/vnd.schemaregistry+json; qs=0.9, application/json; qs=0.5"
)


def subject_for(record_full_name: str) -> str:
    """Return the subject of a record schema under RecordNameStrategy: its full record name.

    RecordNameStrategy (Confluent ``io.confluent.kafka.serializers.subject.RecordNameStrategy``)
    keys a schema by record type, not by topic, so one record type has one evolution history
    whatever topics carry it: ``"switchboard.InboundMessage"`` → ``"switchboard.InboundMessage"``.
    """
    return record_full_name


class SchemaRegistry(Protocol):
    """What the codec needs from a Schema Registry (HTTP client or in-memory double)."""

    async def register(self, subject: str, schema_json: str) -> int:
        """Register an Avro schema (JSON string) under ``subject``; return its id."""
        ...

    async def get_schema(self, schema_id: int) -> dict[str, Any]:
        """Return the Avro schema (parsed JSON) with id ``schema_id``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class SchemaRegistryClient:
    """Client of the Confluent Schema Registry REST API (subset: register, schema by id).

    Source: Confluent Schema Registry API reference,
    https://docs.confluent.io/platform/current/schema-registry/develop/api.html.

    Args:
        url: Base URL, e.g. ``"http://schema-registry:8081"``.
        timeout_s: Timeout of each HTTP call in seconds.
        auth: Optional basic-auth ``(user, password)`` (Confluent Cloud API key and secret).
    """

    def __init__(
        self, url: str, *, timeout_s: float = 10, auth: tuple[str, str] | None = None
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=timeout_s,
            auth=auth,
            headers={"Accept": _ACCEPT},
        )

    async def register(self, subject: str, schema_json: str) -> int:
        """Register an Avro schema under a subject (``POST /subjects/{subject}/versions``).

        Registering a schema that is already registered returns its existing id.

        Args:
            subject: Subject name; see :func:`subject_for`.
            schema_json: The Avro schema as a JSON string.

        Returns:
            The registry-wide schema id.

        Raises:
            SchemaRegistryError: Transport failure, non-2xx status (e.g. 409 incompatible
                schema, 422 invalid schema) or a response without an integer ``id``.
        """
        body = json.dumps({"schema": schema_json}).encode()
        path = f"/subjects/{quote(subject, safe='')}/versions"
        payload = await self._call("POST", path, content=body)
        schema_id = payload.get("id")
        if not isinstance(schema_id, int):
            raise SchemaRegistryError(f"POST {path}: response has no integer id: {payload!r}")
        logger.debug("registered subject %s as schema id %d", subject, schema_id)
        return schema_id

    async def get_schema(self, schema_id: int) -> dict[str, Any]:
        """Fetch a schema by id (``GET /schemas/ids/{id}``).

        Returns:
            The Avro schema, parsed from the response's ``schema`` string.

        Raises:
            SchemaRegistryError: Transport failure, non-2xx status (404 / error_code 40403 for
                an unknown id); not ``retriable`` for a non-Avro ``schemaType``, a missing or
                invalid ``schema`` string, or a schema that is not a JSON object (asking again
                returns the same answer).
        """
        path = f"/schemas/ids/{int(schema_id)}"
        payload = await self._call("GET", path)
        schema_type = payload.get("schemaType", "AVRO")
        if schema_type != "AVRO":
            raise SchemaRegistryError(
                f"schema id {schema_id} is {schema_type}, not AVRO", retriable=False
            )
        try:
            schema = json.loads(payload["schema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaRegistryError(
                f"GET {path}: no valid schema string: {exc}", retriable=False
            ) from exc
        if not isinstance(schema, dict):
            raise SchemaRegistryError(
                f"schema id {schema_id} is not a JSON object: {schema!r}", retriable=False
            )
        return schema

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> SchemaRegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _call(
        self, method: str, path: str, *, content: bytes | None = None
    ) -> dict[str, Any]:
        headers = {"Content-Type": CONTENT_TYPE} if content is not None else None
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise SchemaRegistryError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.is_error:
            error_code = message = None
            if isinstance(payload, dict):
                error_code, message = payload.get("error_code"), payload.get("message")
            raise SchemaRegistryError(
                f"{method} {path}: {message or response.reason_phrase}",
                status=response.status_code,
                error_code=error_code if isinstance(error_code, int) else None,
            )
        if not isinstance(payload, dict):
            raise SchemaRegistryError(f"{method} {path}: response is not a JSON object")
        return payload


class InMemorySchemaRegistry:
    """In-process Schema Registry for unit tests: ids from 1, one id per distinct schema."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self.subjects: dict[str, list[int]] = {}
        """Subject → ids registered under it, oldest first (for assertions in tests)."""

    async def register(self, subject: str, schema_json: str) -> int:
        """Register a schema; the same schema (any subject) always gets the same id."""
        schema = json.loads(schema_json)
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        schema_id = self._ids.setdefault(key, len(self._ids) + 1)
        self._schemas[schema_id] = schema
        versions = self.subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
        return schema_id

    async def get_schema(self, schema_id: int) -> dict[str, Any]:
        """Return the schema with that id.

        Raises:
            SchemaRegistryError: Unknown id (status 404, error_code 40403, as the real registry).
        """
        try:
            return copy.deepcopy(self._schemas[schema_id])
        except KeyError:
            raise SchemaRegistryError(
                f"Schema {schema_id} not found", status=404, error_code=40403
            ) from None

    async def aclose(self) -> None:
        """Nothing to release."""
