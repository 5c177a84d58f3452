"""A Confluent-compatible Schema Registry on loopback: the two REST endpoints the codec uses.

``POST /subjects/{subject}/versions`` and ``GET /schemas/ids/{id}``, with the registry's
content type (``application/vnd.schemaregistry.v1+json``, checked on requests) and its error
bodies (``{"error_code": 40403, "message": "Schema not found"}``), as documented in
Confluent's Schema Registry API reference. An identical schema registered again keeps its id,
as the real registry does.

``LoopbackRegistry`` serves it from the test's own event loop (for clients in that loop);
``RegistryThread`` from a thread of its own (for worker processes, while the test blocks).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from schemas.schema_registry_client import CONTENT_TYPE

__all__ = ["LoopbackRegistry", "RegistryThread"]


@dataclass
class LoopbackRegistry:
    """Registry state and handlers; every field can be read or set by the test."""

    ids: dict[str, int] = field(default_factory=dict)
    schemas: dict[int, str] = field(default_factory=dict)
    subjects: dict[str, list[int]] = field(default_factory=dict)
    content_types: list[str] = field(default_factory=list)
    schema_types: dict[int, str] = field(default_factory=dict)
    """Schema id → ``schemaType`` answered (Avro, the default, is left out as the registry does)."""
    fetched: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    """Schema id → error status answered for it (e.g. 422, 401)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/subjects/{subject}/versions", self.register)
        app.router.add_get("/schemas/ids/{schema_id}", self.get_schema)
        return app

    @staticmethod
    def error(status: int, code: int, message: str) -> web.Response:
        body = {"error_code": code, "message": message}
        return web.json_response(body, status=status, content_type=CONTENT_TYPE)

    async def register(self, request: web.Request) -> web.Response:
        self.content_types.append(request.headers.get("Content-Type", ""))
        if request.content_type != CONTENT_TYPE:
            return self.error(415, 415, f"unsupported content type {request.content_type}")
        subject = request.match_info["subject"]
        if subject == "boom":
            return self.error(500, 50001, "Error in the backend datastore")
        schema = (await request.json())["schema"]
        try:
            key = json.dumps(json.loads(schema), sort_keys=True)
        except ValueError:
            return self.error(422, 42201, "Invalid schema")
        schema_id = self.ids.setdefault(key, 100 + len(self.ids))
        self.schemas[schema_id] = schema
        self.subjects.setdefault(subject, []).append(schema_id)
        return web.json_response({"id": schema_id}, content_type=CONTENT_TYPE)

    async def get_schema(self, request: web.Request) -> web.Response:
        schema_id = int(request.match_info["schema_id"])
        self.fetched.append(schema_id)
        if schema_id in self.statuses:
            status = self.statuses[schema_id]
            return self.error(status, status * 100 + 1, "refused")
        if schema_id not in self.schemas:
            return self.error(404, 40403, "Schema not found")
        body = {"schema": self.schemas[schema_id]}
        if schema_id in self.schema_types:
            body["schemaType"] = self.schema_types[schema_id]
        return web.json_response(body, content_type=CONTENT_TYPE)


class RegistryThread:
    """Serve a ``LoopbackRegistry`` on ``127.0.0.1:<free port>`` from a thread of its own.

    Use as a context manager; ``url`` is set on entry, the server is stopped on exit.
    """

    def __init__(self, registry: LoopbackRegistry | None = None) -> None:
        self.registry = registry or LoopbackRegistry()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> str:
        self._runner = web.AppRunner(self.registry.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def __enter__(self) -> RegistryThread:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
