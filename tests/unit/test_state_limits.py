"""The conversation stage never stores a state too large for its changelog.

Before the guard, one input whose new state encoded (as JSON) to more than the producer's
``max_request_size`` had its effects sent, and then the changelog write failed after the
batch's acknowledgements: the worker exited without committing, and the replay did the same on
every worker that took the partition. Now the input is dead-lettered instead, the conversation
keeps its state and goes on.

The stage is driven without a broker: ``_handle`` over a ``Batch`` of a real ``ChangelogTable``
whose producer (``RecordingProducer``) refuses records over its ``max_request_size`` the way
aiokafka's ``send()`` does; the batch's after-acknowledgement actions (the changelog write) are
run as ``BatchConsumer._finish`` runs them.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import REGISTRY
from support.producer import RecordingProducer
from support.records import consumed
from support.records import llm_answer as answer

from processors.conversation import on_llm_response, on_user_turn
from processors.conversation_state import ConversationState
from processors.preprocess import conversation_key
from schemas.models import (
    AvroRecord,
    ConversationEvent,
    DeadLetter,
    DeliveryRequest,
    LLMRequest,
    LLMResponse,
    LLMStatus,
    utcnow,
)
from streams.agents import conversation as agent
from streams.agents.conversation import Batch, _decode_state, _encode_state, _handle
from streams.runtime import Runtime
from streams.settings import Settings, default_config_path, load_config
from streams.table import CHANGELOG_HEADROOM_BYTES, ChangelogTable, Encoded
from streams.transport import MAX_REQUEST_SIZE, BatchContext, handling

LIMIT = 64 * 1024
"""The producer's max_request_size in most tests here: small, so that states are cheap."""
TOPICS = {
    name: f"t.{name}"
    for name in (
        "conversations",
        "llm_requests",
        "llm_responses",
        "delivery_requests",
        "analytics",
        "deadletter",
        "handoff",
    )
}
CHANGELOG = "t.changelog"
TENANT = "acme"
CONVERSATION = "c1"
KEY = conversation_key(TENANT, CONVERSATION).encode()


class Stage:
    """The conversation stage of one worker holding partition 0, without a broker."""

    def __init__(self, tmp_path: Path, max_request_size: int = LIMIT) -> None:
        self.rt = Runtime(Settings(data_dir=tmp_path), load_config(default_config_path()))
        self.producer = RecordingProducer(max_request_size=max_request_size)
        self.rt.kafka = self.producer  # type: ignore[assignment]
        self.table: ChangelogTable[ConversationState] = ChangelogTable(
            self.rt.settings,
            self.producer,  # type: ignore[arg-type]
            CHANGELOG,
            encode=_encode_state,
            decode=_decode_state,
        )
        self.table._data[0] = {}  # partition 0 held (what restore() does on assignment)
        self.offset = 0

    def record(self, value: AvroRecord) -> ConsumerRecord[bytes, bytes]:
        self.offset += 1
        data = self.rt.codec.encode(value)
        return consumed(TOPICS["conversations"], 0, self.offset, data, key=KEY)

    async def batch(self, *records: AvroRecord) -> None:
        """Handle one batch, then run its after-acknowledgement actions (the changelog
        writes) as ``BatchConsumer._finish`` does: an exception here is what made the worker
        exit with status 70."""
        ctx = BatchContext()
        with handling(ctx):
            batch = Batch(self.table)
            for value in records:
                await _handle(self.rt, TOPICS, batch, self.record(value))
            batch.commit()
        with handling(BatchContext()):
            for action in ctx.after:
                await action()

    def sent(self, topic: str) -> list[bytes]:
        return [s.value for s in self.producer.sent if s.topic == TOPICS.get(topic, topic)]

    def requests(self) -> list[LLMRequest]:
        return [self.rt.codec.decode(v, LLMRequest) for v in self.sent("llm_requests")]

    def deliveries(self) -> list[DeliveryRequest]:
        return [self.rt.codec.decode(v, DeliveryRequest) for v in self.sent("delivery_requests")]

    def letters(self) -> list[DeadLetter]:
        return [self.rt.codec.decode(v, DeadLetter) for v in self.sent("deadletter")]

    def state(self) -> ConversationState:
        state = self.table.get(0, KEY)
        assert state is not None
        return state


def turn(event_id: str, content: str = "hello", **fields: object) -> ConversationEvent:
    now = utcnow()
    return ConversationEvent.model_validate(
        {
            "event_id": event_id,
            "conversation_id": CONVERSATION,
            "tenant": TENANT,
            "content": content,
            "sender": "user@example.com",
            "origin_created_at": now,
            "created_at": now,
            **fields,
        }
    )


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _too_large_counts() -> tuple[float, float]:
    return (
        _count("switchboard_stage_errors_total", stage="conversation", error_type="StateTooLarge"),
        _count("switchboard_deadletters_total", stage="conversation.state", reason="StateTooLarge"),
    )


def _size_in(reason: str) -> int:
    found = re.search(r"new state would be (\d+) bytes", reason)
    assert found is not None, reason
    return int(found.group(1))


def _would_be(stage: Stage, event: ConversationEvent) -> int:
    """Size of the state the stage's own transition makes of ``event`` (at another instant,
    so within a few bytes: timestamps of a whole millisecond are written shorter)."""
    config = stage.rt.config
    state = stage.table.get(0, KEY)
    new = on_user_turn(
        state,
        event,
        persona=config.routing.default_persona,
        override_continuity=False,
        continuity=config.routing.continuity,
        cfg=config.conversation,
        personas=config.personas,
        now=utcnow(),
    ).state
    return len(_encode_state(new))


def _would_be_with(stage: Stage, response: LLMResponse) -> int:
    """Size of the state the stage's own transition makes of ``response`` (as ``_would_be``)."""
    state = stage.table.get(0, KEY)
    assert state is not None
    new = on_llm_response(state, response, cfg=stage.rt.config.conversation, now=utcnow()).state
    return len(_encode_state(new))


@pytest.fixture
def stage(tmp_path: Path) -> Stage:
    return Stage(tmp_path)


BLOB = "\x01" * 12_000
"""Metadata of 12,000 bytes in Avro and 72,000 as JSON (``\\u0001`` each): over LIMIT."""


async def test_turn_whose_new_state_is_too_large_is_dead_lettered_and_the_state_kept(
    stage: Stage,
) -> None:
    await stage.batch(turn("m1", "first question"))
    (first,) = stage.requests()
    await stage.batch(answer(first, "first answer"))
    before = stage.state()
    errors, letters = _too_large_counts()
    big = turn("m2", "second question", metadata={"x": BLOB})
    expected = _would_be(stage, big)
    assert expected > LIMIT

    await stage.batch(big)  # before the guard: MessageSizeTooLargeError here (exit 70)

    (letter,) = stage.letters()
    assert letter.stage == "conversation.state"
    assert letter.error_type == "StateTooLarge"
    assert letter.message_id == "m2"
    assert letter.tenant == TENANT
    assert letter.original_key == KEY
    assert letter.original_value == stage.rt.codec.encode(big)
    limit = stage.table.max_value_bytes(KEY)
    assert limit == LIMIT - len(KEY) - CHANGELOG_HEADROOM_BYTES
    assert f"over the limit of {limit} bytes" in letter.reason
    assert abs(_size_in(letter.reason) - expected) <= 16
    assert len(stage.requests()) == 1  # no LLM request for m2
    assert stage.state() == before  # not applied: m2 not queued, not remembered
    assert "m2" not in stage.state().recent_ids
    assert _too_large_counts() == (errors + 1, letters + 1)

    await stage.batch(turn("m3", "third question"))  # the conversation goes on
    third = stage.requests()[-1]
    assert third.turn_id == "m3"
    assert [m.content for m in third.messages][-3:] == [
        "first question",
        "first answer",
        "third question",
    ]
    await stage.batch(answer(third, "third answer"))
    assert [d.content for d in stage.deliveries()] == ["first answer", "third answer"]
    assert len(stage.letters()) == 1


async def test_in_one_batch_the_records_after_a_refused_one_are_handled(stage: Stage) -> None:
    await stage.batch(turn("m1"), turn("m2", metadata={"x": BLOB}), turn("m3"))
    assert [letter.message_id for letter in stage.letters()] == ["m2"]
    assert [r.turn_id for r in stage.requests()] == ["m1"]
    state = stage.state()
    assert state.pending is not None
    assert state.pending.turn_id == "m1"
    assert [t.turn_id for t in state.queue] == ["m3"]
    (changelog,) = stage.sent(CHANGELOG)  # the batch's one write, the state after m3
    assert _decode_state(changelog) == state


async def test_turn_queued_behind_a_pending_one_is_refused_and_the_queue_still_drains(
    stage: Stage,
) -> None:
    await stage.batch(turn("m1"))
    await stage.batch(turn("m2", metadata={"x": BLOB}))  # would wait in the queue
    await stage.batch(turn("m3"))
    assert [t.turn_id for t in stage.state().queue] == ["m3"]
    (first,) = stage.requests()
    await stage.batch(answer(first))
    assert [r.turn_id for r in stage.requests()] == ["m1", "m3"]
    assert [letter.message_id for letter in stage.letters()] == ["m2"]


async def test_a_reply_too_large_for_the_state_is_dead_lettered_and_the_apology_answers(
    stage: Stage,
) -> None:
    await stage.batch(turn("m1"), turn("m2", "and then?"))
    (request,) = stage.requests()
    too_large = answer(request, "y" * (LIMIT - 2_000)).model_copy(
        update={"prompt_tokens": 7, "completion_tokens": 16_000}
    )
    await stage.batch(too_large)  # the reply would join the history

    (letter,) = stage.letters()
    assert letter.stage == "conversation.state"
    assert letter.message_id == "m1"  # the turn answered
    assert _size_in(letter.reason) > stage.table.max_value_bytes(KEY)
    assert "answered with the persona's failure reply instead" in letter.reason
    assert stage.rt.codec.decode(letter.original_value, LLMResponse) == too_large  # kept
    apology = stage.rt.config.persona(request.persona).apology_reply
    assert [d.content for d in stage.deliveries()] == [apology]  # not left pending
    state = stage.state()
    assert state.pending is not None
    assert state.pending.turn_id == "m2"  # the queued turn goes on
    assert [r.turn_id for r in stage.requests()] == ["m1", "m2"]
    assert (state.completion_tokens, state.fallback_replies) == (16_000, 1)  # usage kept

    await stage.batch(answer(request, "a short answer"))  # e.g. the re-issued turn's
    assert len(stage.deliveries()) == 1  # the turn was answered: a duplicate


async def test_a_turn_whose_last_request_got_no_response_is_answered_by_the_stage(
    stage: Stage,
) -> None:
    cfg = stage.rt.config.conversation
    await stage.batch(turn("m1"))
    tick = turn("tick-1", kind="timeout")
    outcomes = _count(
        "switchboard_llm_outcomes_total", persona="concierge", engine="none", status="no_response"
    )
    issued = stage.state().pending
    assert issued is not None
    assert issued.issued_at is not None
    # each deadline passing re-issues the turn, up to max_llm_attempts requests
    for attempt in range(1, cfg.max_llm_attempts):
        pending = stage.state().pending
        assert pending is not None
        assert pending.issued_at is not None
        stage.table._data[0][KEY] = stage.state().model_copy(
            update={
                "pending": pending.model_copy(
                    update={"issued_at": pending.issued_at - timedelta(hours=1)}
                )
            }
        )
        await stage.batch(tick.model_copy(update={"event_id": f"tick-{attempt}"}))
        assert [r.attempt for r in stage.requests()] == list(range(attempt + 1))
    assert stage.deliveries() == []

    last = stage.state().pending
    assert last is not None
    assert last.issued_at is not None
    stage.table._data[0][KEY] = stage.state().model_copy(
        update={
            "pending": last.model_copy(update={"issued_at": last.issued_at - timedelta(hours=1)})
        }
    )
    await stage.batch(tick.model_copy(update={"event_id": "tick-last"}))
    assert len(stage.requests()) == cfg.max_llm_attempts  # no further request
    apology = stage.rt.config.persona("concierge").apology_reply
    assert [d.content for d in stage.deliveries()] == [apology]
    assert stage.state().pending is None
    assert (
        _count(
            "switchboard_llm_outcomes_total",
            persona="concierge",
            engine="none",
            status="no_response",
        )
        == outcomes + 1
    )


async def test_the_reviewers_record_with_the_real_producer_limit(tmp_path: Path) -> None:
    """1.5 MB of control characters in metadata: 9 MB as JSON, over the 8 MiB limit."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    big = turn("m1", "hi", metadata={"x": "\x01" * 1_500_000})
    await stage.batch(big, turn("m2", "hello again"))
    (letter,) = stage.letters()
    assert letter.error_type == "StateTooLarge"
    assert _size_in(letter.reason) > MAX_REQUEST_SIZE
    assert letter.original_value == stage.rt.codec.encode(big)  # the whole record fits
    assert [r.turn_id for r in stage.requests()] == ["m2"]
    assert all(len(v) < 10_000 for v in stage.sent(CHANGELOG))


async def test_each_new_state_is_encoded_once_and_those_bytes_are_written(
    stage: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[bytes] = []

    def counting(state: ConversationState) -> bytes:
        data = _encode_state(state)
        encoded.append(data)
        return data

    monkeypatch.setattr(agent, "_encode_state", counting)
    stage.table.encode = counting
    await stage.batch(turn("m1"))
    assert len(encoded) == 1
    assert stage.sent(CHANGELOG) == encoded
    (request,) = stage.requests()
    await stage.batch(answer(request), answer(request))  # the second one: a duplicate
    assert len(encoded) == 2  # the duplicate left the state as it was: not encoded again
    assert stage.sent(CHANGELOG)[-1] == encoded[-1]
    assert _decode_state(encoded[-1]) == stage.state()


async def test_put_many_stores_an_encoded_value_and_writes_its_bytes(tmp_path: Path) -> None:
    stage = Stage(tmp_path)
    state = _decode_state(_encode_state(on_user_turn_state()))

    def refuse(value: ConversationState) -> bytes:
        raise AssertionError("an Encoded value is not encoded again")

    stage.table.encode = refuse
    ctx = BatchContext()
    with handling(ctx):
        stage.table.put_many([(0, b"k", Encoded(state, b"given bytes")), (0, b"gone", None)])
    assert stage.table.get(0, b"k") is state
    with handling(BatchContext()):
        for action in ctx.after:
            await action()
    assert [(s.key, s.value) for s in stage.producer.sent] == [
        (b"k", b"given bytes"),
        (b"gone", None),
    ]


def on_user_turn_state() -> ConversationState:
    config = load_config(default_config_path())
    return on_user_turn(
        None,
        turn("m1"),
        persona=config.routing.default_persona,
        override_continuity=False,
        continuity=True,
        cfg=config.conversation,
        personas=config.personas,
        now=utcnow(),
    ).state


async def test_a_turn_beyond_max_queued_turns_is_dead_lettered_as_queue_full(
    stage: Stage,
) -> None:
    config = stage.rt.config
    stage.rt.config = config.model_copy(
        update={"conversation": config.conversation.model_copy(update={"max_queued_turns": 1})}
    )
    await stage.batch(turn("m1"), turn("m2"), turn("m3"))
    (letter,) = stage.letters()
    assert (letter.stage, letter.error_type, letter.message_id) == (
        "conversation.queue",
        "QueueFull",
        "m3",
    )
    assert "max_queued_turns" in letter.reason
    assert stage.rt.codec.decode(letter.original_value, ConversationEvent).event_id == "m3"
    assert [q.turn_id for q in stage.state().queue] == ["m2"]
    assert [r.turn_id for r in stage.requests()] == ["m1"]


async def test_the_winning_escalated_response_goes_to_the_handoff_topic(stage: Stage) -> None:
    await stage.batch(turn("m1", "I want a human"))
    (request,) = stage.requests()
    escalated = answer(request, "A colleague will take over.").model_copy(
        update={"status": LLMStatus.ESCALATED, "error": "escalation trigger 'human'"}
    )
    await stage.batch(escalated)
    (sent,) = stage.sent("handoff")
    handoff = stage.rt.codec.decode(sent, ConversationEvent)
    assert (handoff.event_id, handoff.kind.value, handoff.content) == (
        "m1:handoff",
        "handoff",
        "I want a human",
    )
    assert handoff.metadata["handoff.reason"] == "escalation trigger 'human'"
    assert [d.content for d in stage.deliveries()] == ["A colleague will take over."]
    assert stage.state().status.value == "handoff"


async def test_an_input_that_changes_no_state_writes_no_changelog_record(stage: Stage) -> None:
    await stage.batch(turn("m1"))
    written = len(stage.sent(CHANGELOG))
    assert written == 1
    await stage.batch(turn("m1"))  # a redelivered duplicate: dropped, the state unchanged
    assert len(stage.sent(CHANGELOG)) == written
    assert [r.turn_id for r in stage.requests()] == ["m1"]


def _shed_count() -> float:
    return _count("switchboard_history_turns_shed_total")


async def test_a_turn_that_would_overflow_the_state_sheds_old_history_instead_of_refusal(
    stage: Stage,
) -> None:
    """Two long replies in the history and turns queued with big metadata: the next turn used
    to be dead-lettered as StateTooLarge. Now the oldest history turns go, and every turn is
    answered in order."""
    shed = _shed_count()
    for i in (1, 2):
        await stage.batch(turn(f"m{i}", f"q{i}"))
        await stage.batch(answer(stage.requests()[-1], f"a{i}" + "a" * 18_000))
    await stage.batch(turn("m3", "q3"))  # pending
    blob = "\x01" * 1_500  # 9,000 bytes of JSON in each queued turn's metadata
    await stage.batch(*[turn(f"m{i}", f"q{i}", metadata={"x": blob}) for i in (4, 5)])
    last = turn("m6", "q6", metadata={"x": blob})
    assert _would_be(stage, last) > stage.table.max_value_bytes(KEY)

    await stage.batch(last)  # before: dead-lettered

    assert stage.letters() == []
    assert [t.turn_id for t in stage.state().queue] == ["m4", "m5", "m6"]
    assert [t.content[:2] for t in stage.state().history] == ["q2", "a2", "q3"]  # q1, a1 went
    assert _shed_count() == shed + 2
    for _ in range(4):  # m3 to m6 answered in order
        await stage.batch(answer(stage.requests()[-1], "short"))
    assert [r.turn_id for r in stage.requests()] == [f"m{i}" for i in range(1, 7)]
    assert len(stage.deliveries()) == 6
    assert stage.state().pending is None
    limit = stage.table.max_value_bytes(KEY)
    assert all(len(v) <= limit for v in stage.sent(CHANGELOG))
    assert "m1" in stage.state().answered_ids  # the dedup ids stay: a replayed m1 is dropped
    await stage.batch(turn("m1", "q1 again"))
    assert stage.requests()[-1].turn_id == "m6"
    assert stage.letters() == []


async def test_a_response_near_the_limit_sheds_history_and_issues_the_queued_turn(
    stage: Stage,
) -> None:
    """A full queue left too little room for the pending turn's reply: the response used to be
    refused, the turn stayed pending and was re-issued at every deadline."""
    await stage.batch(turn("m1", "q1"))
    await stage.batch(answer(stage.requests()[-1], "a1" + "a" * 20_000))
    await stage.batch(turn("m2", "q2"))  # pending
    blob = "\x01" * 1_500  # 9,000 bytes of JSON in each queued turn's metadata
    queued = [turn(f"m{i}", f"q{i}", metadata={"x": blob}) for i in range(3, 7)]
    await stage.batch(*queued)
    assert [t.turn_id for t in stage.state().queue] == ["m3", "m4", "m5", "m6"]
    before = len(_encode_state(stage.state()))
    reply = "b" * (stage.table.max_value_bytes(KEY) - before + 1_000)
    (request,) = [r for r in stage.requests() if r.turn_id == "m2"]

    await stage.batch(answer(request, reply))  # before: dead-lettered, m2 stayed pending

    assert stage.letters() == []
    assert [d.content for d in stage.deliveries()][-1] == reply
    assert stage.requests()[-1].turn_id == "m3"
    state = stage.state()
    assert state.pending is not None
    assert state.pending.turn_id == "m3"
    assert "a1" not in [t.content[:2] for t in state.history]  # the big old reply went
    assert state.history[-1].turn_id == "m3"  # the turn in flight stays last
    assert len(stage.sent(CHANGELOG)[-1]) <= stage.table.max_value_bytes(KEY)


@pytest.mark.parametrize(
    ("fields", "error_type", "reason"),
    [
        ({"tenant": "acme/eu"}, "InvalidTenant", "tenant 'acme/eu' contains '/'"),
        ({"tenant": ""}, "InvalidTenant", "tenant '' is empty"),
        ({"event_id": " "}, "MissingEventId", "event_id ' ' is blank"),
    ],
)
async def test_a_record_written_straight_to_the_conversations_topic_gets_ingest_rules(
    stage: Stage, fields: dict[str, str], error_type: str, reason: str
) -> None:
    # Tenant "acme/eu" with conversation "c1" and tenant "acme" with conversation "eu/c1"
    # would share the key "acme/eu/c1": one state and one history for two tenants.
    event = turn("m1", "q1").model_copy(update=fields)
    await stage.batch(event)
    (letter,) = stage.letters()
    assert (letter.stage, letter.error_type) == ("conversation.validate", error_type)
    assert reason in letter.reason
    assert stage.requests() == []
    assert list(stage.table.items()) == []  # no state, under any key
    assert stage.sent(CHANGELOG) == []
    assert letter.original_value == stage.rt.codec.encode(event)


async def test_states_fit_a_changelog_created_with_a_lower_max_message_bytes(
    tmp_path: Path,
) -> None:
    """The changelog topic was created elsewhere with ``max.message.bytes`` far below the
    producer's ``max_request_size``: history is shed to fit the topic, not the producer, so
    the broker never refuses a changelog record (before: the worker exited with status 70 at
    the first state over the topic's limit, and again after every restart)."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    stage.producer.record_limits[CHANGELOG] = LIMIT
    limit = stage.table.max_value_bytes(KEY)
    assert limit == LIMIT - len(KEY) - CHANGELOG_HEADROOM_BYTES
    for i in range(1, 5):
        await stage.batch(turn(f"m{i}", f"q{i}"))
        await stage.batch(answer(stage.requests()[-1], f"a{i}" + "a" * (LIMIT // 3)))
    assert [d.content[:2] for d in stage.deliveries()] == [f"a{i}" for i in range(1, 5)]
    written = stage.sent(CHANGELOG)
    assert max(len(v) for v in written) <= limit
    assert [t.content[:2] for t in stage.state().history][-2:] == ["q4", "a4"]
    assert stage.state().history[0].content[:2] != "q1"  # the oldest turns went
    assert stage.letters() == []


def _trimmed_count() -> float:
    return _count("switchboard_llm_request_messages_trimmed_total")


async def test_a_request_over_a_lower_llm_requests_limit_leaves_out_its_oldest_messages(
    tmp_path: Path,
) -> None:
    """The LLM-requests topic was created elsewhere with a ``max.message.bytes`` below the
    changelog's: the history fits the state but not one request. Before, every later input of
    the conversation was dead-lettered (the send raised); now the request leaves out the
    oldest messages, the state keeps them, and every turn is answered."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    request_limit = 8 * 1024
    stage.producer.record_limits[TOPICS["llm_requests"]] = request_limit
    trimmed = _trimmed_count()
    for i in range(1, 5):
        await stage.batch(turn(f"m{i}", f"q{i}"))
        await stage.batch(answer(stage.requests()[-1], f"a{i}" + "a" * 3_000))

    assert stage.letters() == []
    assert [d.content[:2] for d in stage.deliveries()] == [f"a{i}" for i in range(1, 5)]
    requests = stage.requests()
    assert [r.turn_id for r in requests] == ["m1", "m2", "m3", "m4"]
    sizes = [s.size for s in stage.producer.sent if s.topic == TOPICS["llm_requests"]]
    assert max(sizes) <= request_limit
    # m4's request would carry q1 a1 q2 a2 q3 a3 q4 (~9 KB): the oldest went, q4 stayed last
    last = [m.content[:2] for m in requests[-1].messages]
    assert last[-1] == "q4"
    assert "q1" not in last
    assert "a1" not in last
    assert len(last) < 7
    assert [t.content[:2] for t in stage.state().history][:2] == ["q1", "a1"]  # state keeps them
    assert _trimmed_count() >= trimmed + 7 - len(last)


async def test_a_user_message_alone_over_the_limit_is_asked_with_its_end_cut(
    tmp_path: Path,
) -> None:
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    stage.producer.record_limits[TOPICS["llm_requests"]] = 2 * 1024
    cut = _count("switchboard_llm_request_contents_cut_total")
    await stage.batch(turn("m1", "é" * 3_000))  # 6,000 bytes of UTF-8

    [request] = stage.requests()
    [message] = request.messages
    assert 900 < len(message.content) < 1_024  # whole characters: no split "é"
    assert set(message.content) == {"é"}
    [sent] = [s for s in stage.producer.sent if s.topic == TOPICS["llm_requests"]]
    assert 2 * 1024 - 8 <= sent.size <= 2 * 1024  # cut by what was over, give or take a byte
    assert stage.state().history[-1].content == "é" * 3_000  # the state keeps it whole
    assert _count("switchboard_llm_request_contents_cut_total") == cut + 1
    await stage.batch(answer(request, "an answer"))
    assert [d.content for d in stage.deliveries()] == ["an answer"]
    assert stage.letters() == []


async def test_a_request_whose_other_fields_alone_are_over_the_limit_raises_unapplied(
    tmp_path: Path,
) -> None:
    """No trimming can help: ``_handle`` raises and applies nothing; the stage's ``handle``
    dead-letters the input (``internal_error``), as for any record that raises."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    stage.producer.record_limits[TOPICS["llm_requests"]] = 2 * 1024
    with pytest.raises(MessageSizeTooLargeError, match=r"\d+ bytes > 2048"):
        await stage.batch(turn("m1", "hi", metadata={"x": "y" * 3_000}))
    assert stage.requests() == []
    assert stage.table.get(0, KEY) is None  # the turn was not applied to the state


async def test_a_reply_over_the_delivery_requests_limit_is_dead_lettered_and_the_apology_answers(
    tmp_path: Path,
) -> None:
    """The delivery-requests topic takes less than the reply: before, the response was
    dead-lettered as an internal error with the turn left pending, asked of the LLM again at
    every deadline, and the queued turn behind it waited."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    stage.producer.record_limits[TOPICS["delivery_requests"]] = 4 * 1024
    errors = _count(
        "switchboard_stage_errors_total", stage="conversation", error_type="ReplyTooLarge"
    )
    await stage.batch(turn("m1"), turn("m2", "and then?"))
    (request,) = stage.requests()
    too_large = answer(request, "y" * 6_000)
    await stage.batch(too_large)

    (letter,) = stage.letters()
    assert letter.stage == "conversation.reply"
    assert letter.error_type == "ReplyTooLarge"
    assert letter.message_id == "m1"
    assert "max.message.bytes of t.delivery_requests" in letter.reason
    assert stage.rt.codec.decode(letter.original_value, LLMResponse) == too_large  # kept
    apology = stage.rt.config.persona(request.persona).apology_reply
    assert [d.content for d in stage.deliveries()] == [apology]
    state = stage.state()
    assert state.pending is not None
    assert state.pending.turn_id == "m2"  # the queued turn goes on
    assert [r.turn_id for r in stage.requests()] == ["m1", "m2"]
    assert state.fallback_replies == 1
    assert "y" * 100 not in stage.state().model_dump_json()  # the state keeps the apology
    assert (
        _count("switchboard_stage_errors_total", stage="conversation", error_type="ReplyTooLarge")
        == errors + 1
    )
    await stage.batch(answer(stage.requests()[-1], "a short answer"))
    assert [d.content for d in stage.deliveries()] == [apology, "a short answer"]
    assert len(stage.letters()) == 1


async def test_when_even_the_apology_is_over_the_delivery_limit_the_response_raises(
    tmp_path: Path,
) -> None:
    """The stage's ``handle`` dead-letters what ``_handle`` raises (``internal_error``)."""
    stage = Stage(tmp_path, max_request_size=MAX_REQUEST_SIZE)
    stage.producer.record_limits[TOPICS["delivery_requests"]] = 128
    await stage.batch(turn("m1"))
    with pytest.raises(MessageSizeTooLargeError):
        await stage.batch(answer(stage.requests()[-1], "an answer"))
    assert stage.deliveries() == []
    assert stage.letters() == []
    assert stage.state().pending is not None  # unchanged: the state was not staged


async def test_a_reply_too_large_for_the_state_whose_apology_is_too_large_to_deliver_raises(
    tmp_path: Path,
) -> None:
    """Both limits at once: the reply is over the changelog's limit and the persona's failure
    reply over the delivery-requests topic's. Before, the ``conversation.state`` letter said
    the failure reply had been sent, and then it was not; now nothing is said or sent, and
    the stage's ``handle`` dead-letters what ``_handle`` raises (``internal_error``)."""
    stage = Stage(tmp_path)
    await stage.batch(turn("m1"), turn("m2", "and then?"))
    (request,) = stage.requests()
    too_large = answer(request, "y" * (LIMIT - 2_000))
    assert _would_be_with(stage, too_large) > stage.table.max_value_bytes(KEY)
    stage.producer.record_limits[TOPICS["delivery_requests"]] = 128
    with pytest.raises(MessageSizeTooLargeError):
        await stage.batch(too_large)
    assert stage.letters() == []  # no letter claiming an apology was sent
    assert stage.deliveries() == []
    state = stage.state()
    assert state.pending is not None
    assert state.pending.turn_id == "m1"  # unchanged: the state was not staged
