"""A message id published twice within the dedup window is answered once."""

from __future__ import annotations

import asyncio
import json

import pytest

from processors.ids import new_message_id
from schemas.models import utcnow
from streams.replay import replay
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration


async def test_second_copy_of_a_message_id_is_not_answered_again(stack: EmbeddedStack) -> None:
    message_id = new_message_id(utcnow())
    line = {
        "message_id": message_id,
        "tenant": "dedup",
        "channel": "chat",
        "sender": "twice@example.com",
        "content": "Hello",
    }
    first = await replay(stack.settings(), [line], timeout_s=60, keep_ids=True)
    assert first.summary()["replies_delivered"] == 1
    second = await replay(stack.settings(), [line], timeout_s=4, keep_ids=True)
    assert second.summary()["unaccounted"] == 1  # dropped as a duplicate: no second outcome
    await asyncio.sleep(1.0)
    outbox = (stack.data_dir / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    delivered = [json.loads(x) for x in outbox if message_id in x]
    assert [d["message_id"] for d in delivered] == [message_id]
