"""The ``outbox`` connector: one JSON line per delivery, to a file or to stdout."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import OptionReader, OptionValue, register_connector
from connectors.errors import DeliveryError
from schemas.models import DeliveryRequest, utcnow

__all__ = ["OutboxConnector", "read_outbox"]

log = logging.getLogger(__name__)

STDOUT = "-"
DEFAULT_REMEMBER = 100_000
"""Delivery ids an outbox connector keeps for its duplicate check (the most recent ones)."""


@register_connector("outbox")
class OutboxConnector(DeliveryConnector):
    """Appends each delivery as one JSON object per line (JSON Lines) to ``path``.

    The file is opened with ``O_APPEND`` on the first send (parent directories are created) and
    each line is written with a single ``os.write``, so sends from several processes never
    interleave and a reader sees whole lines. ``path`` ``"-"`` writes to ``sys.stdout``.
    Writes are small and done inline under an ``asyncio.Lock``.

    Idempotent by ``delivery_id`` (file mode): before writing, the connector reads whatever was
    appended to the file since it last looked — by itself, by an earlier run that crashed, or by
    another worker — and skips a delivery id already in the file. A delivery replayed after a
    crash between the write and its delivery report is therefore not written twice. The ids of
    the last ``remember`` lines are kept (default 100,000), so memory stays bounded however long
    the file grows; a replay comes within seconds of its first attempt, and older deliveries
    are recognised before they reach a connector (the delivery stage's Redis keys).

    Line fields: delivery_id, message_id, conversation_id, tenant, channel, recipient, subject,
    content, persona, delivered_at (ISO-8601, UTC, milliseconds).
    """

    name = "outbox"

    def __init__(self, path: Path | str, *, remember: int = DEFAULT_REMEMBER) -> None:
        """Write to ``path``, or to stdout when ``path`` is ``"-"``.

        Raises:
            ValueError: ``remember`` < 1.
        """
        if remember < 1:
            raise ValueError(f"outbox: remember must be >= 1, got {remember}")
        self._path: Path | None = None if str(path) == STDOUT else Path(path)
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self._remember = remember
        self._delivered: set[str] = set()
        self._order: collections.deque[str] = collections.deque()
        self._scanned = 0
        self._indexed = False

    @classmethod
    def from_options(cls, options: Mapping[str, OptionValue], *, data_dir: Path) -> OutboxConnector:
        """Build from options: ``path`` (default ``<data_dir>/outbox.jsonl``; ``-`` = stdout)
        and ``remember`` (delivery ids kept for the duplicate check, default 100,000).

        Raises:
            ValueError: An unknown option, ``path`` not a string, ``remember`` not an integer
                >= 1.
        """
        reader = OptionReader(cls.name, options)
        path = reader.get_str("path", str(data_dir / "outbox.jsonl"))
        remember = reader.get_int("remember", DEFAULT_REMEMBER)
        reader.check_unknown()
        return cls(path, remember=remember)

    def _remember_id(self, delivery_id: str) -> None:
        if delivery_id in self._delivered:
            return
        self._delivered.add(delivery_id)
        self._order.append(delivery_id)
        if len(self._order) > self._remember:
            self._delivered.discard(self._order.popleft())

    @property
    def path(self) -> Path | None:
        """The outbox file, or None when writing to stdout."""
        return self._path

    def _refresh_index(self, path: Path) -> None:
        """Add the delivery ids of lines appended since the last look (whole lines only).

        A ``stat`` first: when the file did not grow since the last look (the usual case with
        one writer), nothing is opened or read.
        """
        try:
            if os.stat(path).st_size == self._scanned:
                return
        except FileNotFoundError:
            return
        try:
            with path.open("rb") as handle:
                handle.seek(self._scanned)
                tail = handle.read()
        except FileNotFoundError:
            return
        end = tail.rfind(b"\n") + 1
        for raw in tail[:end].splitlines():
            try:
                delivery_id = json.loads(raw).get("delivery_id")
            except (ValueError, AttributeError):
                continue  # a foreign or torn line: not ours to index
            if isinstance(delivery_id, str):
                self._remember_id(delivery_id)
        self._scanned += end

    def _write(self, request: DeliveryRequest, data: bytes) -> bool:
        """Write one line unless the delivery id is already in the file; True if written."""
        if self._path is None:
            sys.stdout.write(data.decode("utf-8"))
            sys.stdout.flush()
            return True
        self._refresh_index(self._path)
        if request.delivery_id in self._delivered:
            return False
        if self._fd is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        before = self._scanned
        os.write(self._fd, data)
        self._remember_id(request.delivery_id)
        if os.fstat(self._fd).st_size == before + len(data):
            # Nobody else appended since the index was refreshed: the file is known up to
            # its end, our own line included.
            self._scanned = before + len(data)
        return True

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
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        async with self._lock:
            try:
                if self._path is not None and not self._indexed:
                    # The first look reads the whole existing file: off the event loop.
                    await asyncio.to_thread(self._refresh_index, self._path)
                    self._indexed = True
                written = self._write(request, data)
            except OSError as exc:
                raise DeliveryError(
                    f"outbox write to {self._path or 'stdout'} failed: {exc}", retriable=True
                ) from exc
        if not written:
            log.info(
                "outbox: delivery %s is already in the outbox; not written again",
                request.delivery_id,
            )
        return SendResult(provider_message_id=f"outbox:{request.delivery_id}")

    async def aclose(self) -> None:
        """Close the file (a later send reopens it)."""
        async with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_outbox(path: Path | str) -> list[dict[str, Any]]:
    """Return the records of an outbox file, oldest first (blank lines skipped).

    Raises:
        FileNotFoundError: There is no file at ``path``.
        json.JSONDecodeError: A line is not JSON (e.g. a torn last line after a crash).
    """
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
