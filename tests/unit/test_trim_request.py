"""``trim_request``: an LLM request made to fit a lower ``max.message.bytes``, and the Avro
``long`` size it counts with, checked against fastavro's own encoding."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from fastavro import schemaless_writer
from hypothesis import given
from hypothesis import strategies as st

from processors.conversation import trim_request
from schemas.codec import Codec, avro_long_bytes
from schemas.models import ChatMessage, LLMRequest, Role

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CODEC = Codec()


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_avro_long_bytes_is_the_length_fastavro_writes(value: int) -> None:
    buffer = io.BytesIO()
    schemaless_writer(buffer, {"type": "long"}, value)
    assert avro_long_bytes(value) == len(buffer.getvalue())


def request(*contents: str) -> LLMRequest:
    roles = [Role.USER, Role.ASSISTANT]
    return LLMRequest(
        request_id="t1:0",
        conversation_id="c1",
        tenant="acme",
        turn_id="t1",
        persona="concierge",
        messages=[
            ChatMessage(role=roles[i % 2], content=content) for i, content in enumerate(contents)
        ],
        created_at=T0,
    )


SIZES = (10, 200, 1000, 63, 64, 8_000, 30)


@pytest.mark.parametrize("excess", [1, 14, 15, 300, 1_240, 1_241, 9_000, 9_320])
def test_the_fewest_oldest_messages_go_and_the_body_is_at_least_excess_shorter(
    excess: int,
) -> None:
    original = request(*("x" * n for n in SIZES))
    size = len(CODEC.encode(original))
    trimmed = trim_request(original, excess)

    assert trimmed is not None
    assert trimmed.cut_bytes == 0
    assert trimmed.request.messages == original.messages[trimmed.dropped :]
    assert size - len(CODEC.encode(trimmed.request)) >= excess
    if trimmed.dropped > 1:  # one message fewer would not have been enough
        fewer = original.model_copy(update={"messages": original.messages[trimmed.dropped - 1 :]})
        assert size - len(CODEC.encode(fewer)) < excess
    assert trimmed.request.model_copy(update={"messages": original.messages}) == original


@pytest.mark.parametrize("over", [1, 2, 7, 500])
def test_the_last_message_is_cut_at_its_end_once_only_it_is_left(over: int) -> None:
    original = request("é" * 100, "ü" * 50, "ß" * 600)  # 200 + 100 + 1200 bytes of UTF-8
    size = len(CODEC.encode(original))
    older = len(CODEC.encode(original)) - len(
        CODEC.encode(original.model_copy(update={"messages": original.messages[2:]}))
    )
    trimmed = trim_request(original, older + over)

    assert trimmed is not None
    assert trimmed.dropped == 2
    [last] = trimmed.request.messages
    assert last.role == Role.USER
    assert last.content + "ß" * ((1200 - len(last.content.encode())) // 2) == "ß" * 600
    assert trimmed.cut_bytes == 1200 - len(last.content.encode())
    assert trimmed.cut_bytes in (over, over + 1)  # a split "ß" goes whole
    assert size - len(CODEC.encode(trimmed.request)) >= older + over


def test_none_when_even_an_empty_last_message_is_not_enough() -> None:
    original = request("a" * 100, "b" * 100)
    size = len(CODEC.encode(original))
    empty = original.model_copy(update={"messages": [ChatMessage(role=Role.USER, content="")]})
    room = size - len(CODEC.encode(empty))
    assert trim_request(original, room) is not None
    assert trim_request(original, room + 1) is None


def test_a_request_without_messages_cannot_be_trimmed_and_excess_must_be_positive() -> None:
    assert trim_request(request(), 10) is None
    with pytest.raises(ValueError, match="excess_bytes must be > 0"):
        trim_request(request("a", "b"), 0)
