"""The ``outbox`` connector: one JSON line per delivery, to a file or to stdout."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import OptionReader, OptionValue, register_connector
from connectors.errors import DeliveryError
from schemas.models import DeliveryRequest, utcnow

__all__ = ["OutboxConnector", "read_outbox"]

log = logging.getLogger(__name__)

STDOUT = "-"


@register_connector("outbox")
class OutboxConnector(DeliveryConnector):
    """Appends each delivery as one JSON object per line (JSON Lines) to ``path``.

    The file is opened in append mode on the first send (parent directories are created) and
    each line is written with a single ``write`` and flushed, so concurrent sends never
    interleave and a reader sees whole lines. ``path`` ``"-"`` writes to ``sys.stdout``.
    Writes are small and done inline under an ``asyncio.Lock``.

    Line fields: delivery_id, message_id, conversation_id, tenant, channel, recipient, subject,
    content, persona, delivered_at (ISO-8601, UTC, milliseconds).
    """

    name = "outbox"

    def __init__(self, path: Path | str) -> None:
        """Write to ``path``, or to stdout when ``path`` is ``"-"``."""
        self._path: Path | None = None if str(path) == STDOUT else Path(path)
        self._file: IO[str] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_options(cls, options: Mapping[str, OptionValue], *, data_dir: Path) -> OutboxConnector:
        """Build from options: ``path`` (default ``<data_dir>/outbox.jsonl``; ``-`` = stdout).

        Raises:
            ValueError: An unknown option, or ``path`` is not a string.
        """
        reader = OptionReader(cls.name, options)
        path = reader.get_str("path", str(data_dir / "outbox.jsonl"))
        reader.check_unknown()
        return cls(path)

    @property
    def path(self) -> Path | None:
        """The outbox file, or None when writing to stdout."""
        return self._path

    def _stream(self) -> IO[str]:
        if self._path is None:
            return sys.stdout
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._path.open("a", encoding="utf-8")
        return self._file

    async def send(self, request: DeliveryRequest) -> SendResult:
        """Append ``request`` as one line and return ``outbox:<delivery_id>``.

        Raises:
            DeliveryError: The file cannot be opened or written (retriable: disk full, EACCES
                may be fixed by an operator).
        """
        record = {
            "delivery_id": request.delivery_id,
            "message_id": request.message_id,
            "conversation_id": request.conversation_id,
            "tenant": request.tenant,
            "channel": request.channel.value,
            "recipient": request.recipient,
            "subject": request.subject,
            "content": request.content,
            "persona": request.persona,
            "delivered_at": utcnow().isoformat(timespec="milliseconds"),
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        async with self._lock:
            try:
                stream = self._stream()
                stream.write(line)
                stream.flush()
            except OSError as exc:
                raise DeliveryError(
                    f"outbox write to {self._path or 'stdout'} failed: {exc}", retriable=True
                ) from exc
        log.debug("outbox: wrote delivery %s for %s", request.delivery_id, request.recipient)
        return SendResult(provider_message_id=f"outbox:{request.delivery_id}")

    async def aclose(self) -> None:
        """Close the file (a later send reopens it)."""
        async with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_outbox(path: Path | str) -> list[dict[str, Any]]:
    """Return the records of an outbox file, oldest first (blank lines skipped).

    Raises:
        FileNotFoundError: There is no file at ``path``.
        json.JSONDecodeError: A line is not JSON (e.g. a torn last line after a crash).
    """
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
