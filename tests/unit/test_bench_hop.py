"""The codec chain's per-hop work (``streams.bench.CodecHop``) is the contract layer, whole."""

from __future__ import annotations

import pytest

from schemas.codec import Codec
from schemas.models import ConversationEvent
from streams.bench import CodecHop


def test_a_hop_decodes_the_event_and_encodes_a_copy_with_a_new_id_and_created_at() -> None:
    hop = CodecHop()
    codec = Codec()
    before = codec.decode(hop.value, ConversationEvent)

    after = codec.decode(hop(hop.value), ConversationEvent)

    assert after.model_dump(exclude={"event_id", "created_at"}) == before.model_dump(
        exclude={"event_id", "created_at"}
    )
    assert after.event_id == f"{before.event_id}.1"
    assert after.created_at >= before.created_at
    assert before.content.endswith("(turn 0)")
    assert before.metadata["traceparent"].startswith("00-")


def test_hops_chain_like_the_pipeline_stages_and_reuse_all_they_encoded() -> None:
    hop = CodecHop()
    data = hop.value
    ids = []
    for _ in range(5):
        data = hop(data)
        ids.append(Codec().decode(data, ConversationEvent).event_id)
    first = Codec().decode(hop.value, ConversationEvent).event_id
    assert ids == [f"{first}.{n}" for n in range(1, 6)]  # a new id per hop: distinct bytes
    assert hop.reused == 4  # of five decodes: only the chain's entry decoded in full


def test_every_record_in_flight_is_reused_however_many_there_are() -> None:
    """The worker's codec keeps 8,192 records; the chain's keeps all, so that a hop that
    runs far ahead of the next (thousands of records in flight) does not evict what the next
    would reuse: the chain bounds the pipeline's best case."""
    hop = CodecHop()
    first = [hop(hop.value) for _ in range(20_000)]  # hop 0 far ahead
    second = [hop(data) for data in first]
    assert len(second) == 20_000
    assert hop.reused == 20_000  # every decode of the second hop


def test_the_hop_skips_decoding_the_bytes_it_encoded_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import schemas.codec

    hop = CodecHop()
    second = hop(hop.value)  # the chain's entry is decoded in full, like an inbound record
    calls = []
    real = schemas.codec.schemaless_reader
    monkeypatch.setattr(schemas.codec, "schemaless_reader", lambda *a: calls.append(1) or real(*a))
    hop(second)
    assert calls == []  # kept by the hop that encoded it: no fastavro decode
    hop(hop.value)  # bytes the hop never encoded are decoded in full
    assert calls == [1]


def test_process_cpu_s_counts_this_process_cpu_and_none_for_no_process() -> None:
    import os
    import time

    from streams.bench import process_cpu_s

    before = process_cpu_s(os.getpid())
    assert before is not None
    spin_until = time.process_time() + 0.2
    while time.process_time() < spin_until:
        pass
    after = process_cpu_s(os.getpid())
    assert after is not None
    assert 0.1 <= after - before < 5.0
    assert process_cpu_s(2**22 + 12345) is None  # above pid_max: no such process


def test_process_peak_rss_mb_grows_with_what_this_process_holds() -> None:
    import os
    from pathlib import Path

    from streams.bench import process_peak_rss_mb

    before = process_peak_rss_mb(os.getpid())
    assert before is not None
    status = Path(f"/proc/{os.getpid()}/status").read_text().splitlines()
    rss_mb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    grow_mb = int(before - rss_mb) + 64  # past the earlier peak by 64 MB
    held = bytearray(grow_mb * 1024 * 1024)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: resident
    after = process_peak_rss_mb(os.getpid())
    assert after is not None
    assert after >= before + 48
    assert process_peak_rss_mb(2**22 + 12345) is None
    del held
