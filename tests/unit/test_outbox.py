"""Unit tests of the outbox connector: JSON Lines content, appends, concurrency, stdout."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from connectors.delivery.outbox import OutboxConnector, read_outbox
from connectors.delivery.registry import build_connector
from connectors.errors import DeliveryError
from schemas.models import Channel, DeliveryRequest, utcnow

FIELDS = [
    "delivery_id",
    "message_id",
    "conversation_id",
    "tenant",
    "channel",
    "recipient",
    "subject",
    "content",
    "persona",
    "delivered_at",
]


def make_request(n: int = 1, **changes: object) -> DeliveryRequest:
    now = utcnow()
    fields: dict[str, object] = {
        "delivery_id": f"d-{n}",
        "message_id": f"m-{n}",
        "conversation_id": f"c-{n}",
        "tenant": "acme",
        "channel": Channel.OUTBOX,
        "recipient": f"user{n}@example.com",
        "subject": f"Subject {n}",
        "content": f"Hello number {n}",
        "persona": "helper",
        "origin_created_at": now,
        "created_at": now,
    }
    fields.update(changes)
    return DeliveryRequest.model_validate(fields)


async def test_send_appends_one_json_line_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    connector = OutboxConnector(path)
    before = utcnow()
    result = await connector.send(make_request(1))
    await connector.aclose()

    assert result.provider_message_id == "outbox:d-1"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == FIELDS
    assert record["delivery_id"] == "d-1"
    assert record["message_id"] == "m-1"
    assert record["conversation_id"] == "c-1"
    assert record["tenant"] == "acme"
    assert record["channel"] == "outbox"
    assert record["recipient"] == "user1@example.com"
    assert record["subject"] == "Subject 1"
    assert record["content"] == "Hello number 1"
    assert record["persona"] == "helper"
    delivered_at = datetime.fromisoformat(record["delivered_at"])
    assert delivered_at.utcoffset() == timedelta(0)
    assert before <= delivered_at <= utcnow()


async def test_optional_fields_are_written_as_null_and_unicode_kept(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    connector = OutboxConnector(path)
    await connector.send(
        make_request(2, conversation_id=None, subject=None, persona=None, content="Grüße ✓ 你好")
    )
    await connector.aclose()
    [record] = read_outbox(path)
    assert record["conversation_id"] is None
    assert record["subject"] is None
    assert record["persona"] is None
    assert record["content"] == "Grüße ✓ 你好"
    assert "Grüße ✓ 你好" in path.read_text(encoding="utf-8")


async def test_concurrent_sends_write_whole_distinct_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    connector = OutboxConnector(path)
    long_text = "x" * 20_000
    results = await asyncio.gather(
        *(connector.send(make_request(n, content=f"{n}:{long_text}")) for n in range(60))
    )
    await connector.aclose()
    records = read_outbox(path)
    assert len(records) == 60
    assert {r["delivery_id"] for r in records} == {f"d-{n}" for n in range(60)}
    assert all(r["content"] == f"{r['delivery_id'][2:]}:{long_text}" for r in records)
    assert {r.provider_message_id for r in results} == {f"outbox:d-{n}" for n in range(60)}


async def test_each_line_is_flushed_before_send_returns(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    connector = OutboxConnector(path)
    await connector.send(make_request(1))
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1"]  # readable, not closed yet
    await connector.send(make_request(2))
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1", "d-2"]
    await connector.aclose()


async def test_existing_file_is_appended_to_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    first = OutboxConnector(path)
    await first.send(make_request(1))
    await first.aclose()
    second = OutboxConnector(path)
    await second.send(make_request(2))
    await second.aclose()
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1", "d-2"]


async def test_default_path_and_missing_parent_dirs_are_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    connector = build_connector("outbox", {}, data_dir=data_dir)
    await connector.send(make_request(3))
    await connector.aclose()
    assert [r["delivery_id"] for r in read_outbox(data_dir / "outbox.jsonl")] == ["d-3"]


async def test_dash_path_writes_lines_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    connector = build_connector("outbox", {"path": "-"}, data_dir=tmp_path)
    assert isinstance(connector, OutboxConnector)
    assert connector.path is None
    await connector.send(make_request(4))
    await connector.aclose()
    out = capsys.readouterr().out
    [line] = out.splitlines()
    assert json.loads(line)["delivery_id"] == "d-4"
    assert not (tmp_path / "outbox.jsonl").exists()


async def test_unwritable_path_raises_retriable_delivery_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    connector = OutboxConnector(blocker / "out.jsonl")
    with pytest.raises(DeliveryError) as info:
        await connector.send(make_request(5))
    assert info.value.retriable is True
    assert "a-file" in str(info.value)


async def test_delivery_id_already_in_the_file_is_not_written_again_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.jsonl"
    crashed = OutboxConnector(path)
    await crashed.send(make_request(1))
    # A new process (the crashed worker restarted) replays the same delivery, then a new one.
    restarted = OutboxConnector(path)
    again = await restarted.send(make_request(1))
    await restarted.send(make_request(2))
    await restarted.send(make_request(2))
    await crashed.aclose()
    await restarted.aclose()
    assert again.provider_message_id == "outbox:d-1"
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1", "d-2"]


async def test_lines_appended_by_another_writer_are_seen_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    first, second = OutboxConnector(path), OutboxConnector(path)
    await first.send(make_request(1))
    await second.send(make_request(3))
    await first.send(make_request(3))  # written by the other writer meanwhile
    await first.aclose()
    await second.aclose()
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1", "d-3"]


async def test_only_the_last_remember_ids_are_kept_for_the_duplicate_check(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.jsonl"
    connector = OutboxConnector(path, remember=2)
    for n in (1, 2, 3):
        await connector.send(make_request(n))
    await connector.send(make_request(3))  # recent: recognised
    await connector.send(make_request(1))  # forgotten: written again
    await connector.aclose()
    assert [r["delivery_id"] for r in read_outbox(path)] == ["d-1", "d-2", "d-3", "d-1"]


async def test_a_restart_remembers_only_the_last_ids_of_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    first = OutboxConnector(path)
    for n in range(1, 6):
        await first.send(make_request(n))
    await first.aclose()
    restarted = OutboxConnector(path, remember=2)
    await restarted.send(make_request(5))  # among the last two lines: not written again
    await restarted.send(make_request(1))  # older: written again
    await restarted.aclose()
    ids = [r["delivery_id"] for r in read_outbox(path)]
    assert ids == ["d-1", "d-2", "d-3", "d-4", "d-5", "d-1"]


def test_remember_option_is_read_and_checked(tmp_path: Path) -> None:
    connector = build_connector("outbox", {"remember": "3"}, data_dir=tmp_path)
    assert isinstance(connector, OutboxConnector)
    with pytest.raises(ValueError, match="remember must be >= 1"):
        build_connector("outbox", {"remember": 0}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="remember"):
        build_connector("outbox", {"remember": "many"}, data_dir=tmp_path)
