"""``switchboard bench``: throughput benchmarks of the pipeline, each against a same-run baseline.

Both benchmarks run the embedded stack (Tansu, redis-server, worker processes) on this machine
and print one JSON line whose ``ratio`` compares the pipeline with a baseline measured in the
same run, so the figure holds on a noisy machine where absolute times do not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import queue
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processors.tracing import TRACEPARENT, new_traceparent
from schemas.codec import Codec
from schemas.models import ConversationEvent, utcnow
from streams.replay import ReplayResult, replay
from streams.stack import EmbeddedStack, config_variant

__all__ = [
    "ChainWindow",
    "ChainsRun",
    "CodecHop",
    "bench_llm",
    "bench_pipeline",
    "conversation_lines",
    "parallel_chains_throughput",
    "parallel_chains_windows",
    "raw_chain_window",
]

_QUESTIONS = (
    "My mouse is not responding.",
    "My internet is not working.",
    "I forgot my password.",
    "My laptop screen is black.",
    "I can't hear any sound.",
    "My system is overheating.",
)
PIPELINE_HOPS = 5
"""inbound → conversations → llm.requests → llm.responses → delivery.requests → reports."""


def conversation_lines(
    conversations: int, turns: int, tenant: str = "bench"
) -> list[dict[str, Any]]:
    """Replay lines: ``conversations`` users with ``turns`` turns each, interleaved turn by
    turn (every conversation's turn 0, then every turn 1, ...); conversation ids are
    ``<tenant>-<n>``."""
    return [
        {
            "tenant": tenant,
            "channel": "chat",
            "sender": f"user-{c}@{tenant}.test",
            "conversation_id": f"{tenant}-{c}",
            "content": f"{_QUESTIONS[(c + t) % len(_QUESTIONS)]} (turn {t})",
        }
        for t in range(turns)
        for c in range(conversations)
    ]


def _order_violations(result: ReplayResult, outbox: Path) -> int:
    """Conversations whose outbox order differs from their publish order (or with duplicates)."""
    published, delivered = result.orders(outbox)
    return sum(1 for conv, ids in published.items() if delivered.get(conv) != ids)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from ``/proc/<pid>/stat``
    (fields 14 and 15, in clock ticks; proc(5)); None where there is no such file."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size of process ``pid`` in MB (``VmHWM`` of ``/proc/<pid>/status``,
    kB; proc(5)); None where there is no such file."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _workers_peak_rss_mb(stack: EmbeddedStack) -> float | None:
    peaks = [process_peak_rss_mb(w.process.pid) for w in stack.worker_procs]
    if not peaks or None in peaks:
        return None
    return round(sum(p for p in peaks if p is not None), 1)


def _workers_cpu_s(stack: EmbeddedStack) -> float | None:
    total = 0.0
    for worker in stack.worker_procs:
        used = process_cpu_s(worker.process.pid)
        if used is None:
            return None
        total += used
    return total if stack.worker_procs else None


def _broker_cpu_s(stack: EmbeddedStack) -> float | None:
    return process_cpu_s(stack.broker.process.pid) if stack.broker is not None else None


def _run(
    lines: list[dict[str, Any]],
    *,
    workers: int,
    timeout_s: float,
    mutate: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    unique = uuid.uuid4().hex[:8]
    stack = EmbeddedStack(
        workers=workers,
        data_dir=directory,
        topic_prefix=f"bench-{unique}",
        app_id=f"bench-{unique}",
        config=config_variant(directory, mutate),
    )
    with stack:
        stack.wait_ready()
        cpu_before = _workers_cpu_s(stack)
        broker_before = _broker_cpu_s(stack)
        result = asyncio.run(
            replay(
                stack.settings(),
                lines,
                timeout_s=timeout_s,
                on_progress=lambda *_: stack.check_workers(),
            )
        )
        cpu_after = _workers_cpu_s(stack)
        broker_after = _broker_cpu_s(stack)
        peak_rss_mb = _workers_peak_rss_mb(stack)
    summary = result.summary()
    turns = summary["records_in"]
    cpu_per_turn = None
    if cpu_before is not None and cpu_after is not None and turns:
        cpu_per_turn = round((cpu_after - cpu_before) * 1e6 / turns, 1)
    broker_per_turn = None
    if broker_before is not None and broker_after is not None and turns:
        broker_per_turn = round((broker_after - broker_before) * 1e6 / turns, 1)
    latencies = sorted(o.report.latency_ms for o in result.outcomes.values() if o.report)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "turns": summary["records_in"],
        "unaccounted": summary["unaccounted"],
        "turns_per_s": summary["throughput_msg_s"],
        "p50_ms": summary["latency_p50_ms"],
        "p99_ms": round(p99, 1),
        "order_violations": _order_violations(result, directory / "outbox.jsonl"),
        "worker_cpu_us_per_turn": cpu_per_turn,
        "worker_peak_rss_mb": peak_rss_mb,
        "broker_cpu_us_per_turn": broker_per_turn,
    }


def bench_llm(
    *,
    conversations: int = 2000,
    turns: int = 4,
    latency_s: float = 0.5,
    in_flight: int = 512,
    workers: int = 1,
    baseline_conversations: int = 60,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """I/O-bound: an engine of fixed latency L, C calls in flight; ratio = turns/s ÷ (C / L).

    The baseline is the same pipeline with as many calls in flight as partitions — what a
    consumer answering one turn per partition at a time achieves.
    """

    def tune(limit: int) -> Callable[[dict[str, Any]], None]:
        def mutate(raw: dict[str, Any]) -> None:
            raw["engines"]["local"]["latency_s"] = latency_s
            raw["llm"] = {"max_in_flight": limit}
            raw["conversation"]["llm_deadline_s"] = 600  # no re-issues during the run

        return mutate

    ours = _run(
        conversation_lines(conversations, turns),
        workers=workers,
        timeout_s=timeout_s,
        mutate=tune(in_flight),
    )
    partitions = EmbeddedStack().partitions
    naive = _run(
        conversation_lines(baseline_conversations, 2),
        workers=workers,
        timeout_s=timeout_s,
        mutate=tune(partitions),
    )
    ideal = in_flight / latency_s
    return {
        "benchmark": "llm",
        "latency_s": latency_s,
        "in_flight": in_flight,
        "workers": workers,
        "ideal_turns_per_s": ideal,
        **ours,
        "baseline_one_per_partition": naive,
        "ratio": round(ours["turns_per_s"] / ideal, 3),
        "speedup_vs_baseline": round(ours["turns_per_s"] / max(naive["turns_per_s"], 1e-9), 1),
    }


@dataclass(frozen=True)
class ChainWindow:
    """One raw chain's run (``raw_chain_window``)."""

    start: float
    """``time.monotonic()`` (s) at the first send: CLOCK_MONOTONIC, comparable across the
    processes of this machine."""
    end: float
    """``time.monotonic()`` (s) after the last record was read from the final topic."""
    cpu_s: float
    """CPU time (user + system, s) of the chain's process between ``start`` and ``end``
    (``time.process_time``)."""
    reused: int = 0
    """Codec chains: decodes served from a record the chain had encoded itself (of
    ``records * hops``)."""


@dataclass(frozen=True)
class ChainsRun:
    """Raw chains run side by side (``parallel_chains_throughput``)."""

    records_per_s: float
    """All records moved over the time from the first chain's first send to the last
    chain's last read."""
    cpu_us_per_record: float
    """The chains' CPU time (µs) per record moved, all hops together."""
    reused: float | None = None
    """Codec chains: the share of decodes served from kept records (``(hops - 1) / hops``
    when every record a hop encoded is reused); None for raw chains."""


async def raw_chain_window(
    brokers: str,
    records: int,
    hops: int,
    partitions: int,
    *,
    value: bytes = b"x" * 300,
    transform: Callable[[bytes], bytes] | None = None,
    timeout_s: float = 600.0,
    ready: Callable[[], None] | None = None,
) -> ChainWindow:
    """Move ``records`` through ``hops`` aiokafka consume→produce stages in one process.

    Stage i consumes topic i and produces every record to topic i+1, like a pipeline stage
    with no work of its own; with ``transform``, each stage sends ``transform(value)`` instead
    of the bytes it read. Every record starts as ``value``; the topics are new ones.
    ``ready`` is called once the topics, producer and consumers are set up, just before the
    first send (``parallel_chains_throughput`` lines up its chains there).

    Returns:
        The chain's window: its start and end (``time.monotonic()``, s) and the process's
        CPU time between them.

    Raises:
        TimeoutError: The records were not all read from the final topic in ``timeout_s``.
        Exception: Whatever a stage or ``ready`` raised (``transform``'s errors among them).
    """
    prefix = f"raw-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}.{i}" for i in range(hops + 1)]
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    try:
        await admin.start()
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=brokers, linger_ms=5)
    consumers: list[AIOKafkaConsumer] = []
    tasks: list[asyncio.Task[None]] = []

    async def stage(i: int) -> None:
        moved = 0
        while moved < records:
            for batch in (await consumers[i].getmany(timeout_ms=100, max_records=2000)).values():
                for record in batch:
                    out = record.value if transform is None else transform(record.value)
                    await producer.send(names[i + 1], out, key=record.key)
                moved += len(batch)

    async def sink() -> None:
        seen = 0
        while seen < records:
            batch = await consumers[-1].getmany(timeout_ms=100, max_records=5000)
            seen += sum(len(b) for b in batch.values())

    try:
        await producer.start()
        for name in names:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=brokers, group_id=None, fetch_max_wait_ms=50
            )
            consumers.append(consumer)
            await consumer.start()
            tps = [TopicPartition(name, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        if ready is not None:
            ready()
        started, cpu_started = time.monotonic(), time.process_time()
        tasks.extend(asyncio.create_task(stage(i)) for i in range(hops))
        for n in range(records):
            await producer.send(names[0], value, key=f"k{n % 997}".encode())
        reading = asyncio.create_task(sink())
        tasks.append(reading)
        pending = set(tasks)
        while not reading.done():
            left = started + timeout_s - time.monotonic()
            done, pending = await asyncio.wait(
                pending, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise TimeoutError(f"raw chain: {records} records not through in {timeout_s} s")
            for task in done:
                task.result()  # a stage's exception, raised here
        ended, cpu_s = time.monotonic(), time.process_time() - cpu_started
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in consumers:
            await consumer.stop()
        await producer.stop()
    return ChainWindow(started, ended, cpu_s)


CHAIN_START_TIMEOUT_S = 120.0
"""Longest a chain process waits for its siblings to be set up before it gives up (s)."""


def _chain_window(
    brokers: str,
    records: int,
    hops: int,
    partitions: int,
    *,
    codec: bool,
    timeout_s: float,
    ready: Callable[[], None] | None = None,
) -> ChainWindow:
    """``raw_chain_window`` of a ConversationEvent's bytes, with a ``CodecHop`` at every hop
    if ``codec`` (its reused decodes counted in the window), in an event loop of its own."""
    hop = CodecHop()
    window = asyncio.run(
        raw_chain_window(
            brokers,
            records,
            hops,
            partitions,
            value=hop.value,
            transform=hop if codec else None,
            timeout_s=timeout_s,
            ready=ready,
        )
    )
    return dataclasses.replace(window, reused=hop.reused)


def _chain_process(
    brokers: str,
    records: int,
    hops: int,
    partitions: int,
    codec: bool,
    timeout_s: float,
    barrier: Barrier,
    results: Queue[tuple[str, Any]],
) -> None:
    """One chain of ``parallel_chains_windows``, in a process of its own: its window, or
    its error's text, goes to ``results``."""

    def ready() -> None:
        barrier.wait(CHAIN_START_TIMEOUT_S)  # every chain sends its first record together

    try:
        window = _chain_window(
            brokers, records, hops, partitions, codec=codec, timeout_s=timeout_s, ready=ready
        )
    except BaseException as exc:
        barrier.abort()  # the siblings stop waiting for this chain
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    results.put(("window", window))


def parallel_chains_throughput(
    brokers: str,
    records: int,
    hops: int,
    partitions: int,
    *,
    chains: int,
    codec: bool = False,
    timeout_s: float = 600.0,
) -> ChainsRun:
    """Records/s and CPU µs per record of ``chains`` raw chains run side by side, one
    process each: the baseline for a pipeline of ``chains`` worker processes on the same
    cores.

    Each chain moves ``records // chains`` records (a ``CodecHop`` at every hop if ``codec``)
    through topics of its own (``parallel_chains_windows``); the rate is all records moved
    over the time from the first chain's first send to the last chain's last read. With one
    chain, it runs in this process.

    Raises:
        RuntimeError: A chain failed, or its process ended without a result (killed).
        TimeoutError: The chains had not all finished ``timeout_s`` after they started.
    """
    chains = max(1, chains)
    share = max(1, records // chains)
    if chains == 1:
        windows = [
            _chain_window(brokers, share, hops, partitions, codec=codec, timeout_s=timeout_s)
        ]
    else:
        windows = parallel_chains_windows(
            brokers, share, hops, partitions, chains=chains, codec=codec, timeout_s=timeout_s
        )
    elapsed = max(w.end for w in windows) - min(w.start for w in windows)
    moved = share * chains
    return ChainsRun(
        moved / elapsed,
        sum(w.cpu_s for w in windows) / moved * 1e6,
        sum(w.reused for w in windows) / (moved * hops) if codec else None,
    )


def parallel_chains_windows(
    brokers: str,
    records: int,
    hops: int,
    partitions: int,
    *,
    chains: int,
    codec: bool = False,
    timeout_s: float = 600.0,
) -> list[ChainWindow]:
    """Run ``chains`` raw chains of ``records`` records each, side by side, one spawned
    process each; return their windows (``raw_chain_window``), in the order they finished.

    The chains wait for each other after their set-up (a barrier, at most
    ``CHAIN_START_TIMEOUT_S``) and send their first records together. Every process is ended
    before this returns or raises.

    Raises:
        RuntimeError: A chain failed, or its process ended without a result (killed).
        TimeoutError: The chains had not all finished ``timeout_s`` after they started.
    """
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(chains)
    results: Queue[tuple[str, Any]] = context.Queue()
    processes = [
        context.Process(
            target=_chain_process,
            args=(brokers, records, hops, partitions, codec, timeout_s, barrier, results),
            daemon=True,
        )
        for _ in range(chains)
    ]
    for process in processes:
        process.start()
    windows: list[ChainWindow] = []
    deadline = time.monotonic() + CHAIN_START_TIMEOUT_S + timeout_s
    try:
        while len(windows) < chains:
            try:
                kind, result = results.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw chains not finished in {timeout_s} s") from None
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(
                        f"a raw chain's process {dead[0].pid} ended with exit code "
                        f"{dead[0].exitcode} and no result"
                    ) from None
                continue
            if kind == "error":
                raise RuntimeError(f"a raw chain failed: {result}")
            windows.append(result)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(5)
    return windows


CODEC_CHAIN_KEEP = 1 << 20
"""Records a ``CodecHop`` keeps at most, up to 1 GiB of them: more than a benchmark run has in
flight, so that every record a hop encoded is reused by the next (kept records are dropped
when decoded; only the last hop's, which no hop decodes, stay until the run ends)."""


class CodecHop:
    """The work of the contract layer at one hop of the codec chain, and the bytes of the
    ConversationEvent the chain starts from (``value``).

    A call decodes the bytes into their model (``Codec.decode``: fastavro, then pydantic
    validation), copies the model with a new ``event_id`` and ``created_at`` and encodes the
    copy (model dump, fastavro): what every stage of the pipeline does to a record before and
    after its own logic, and nothing else.

    The codec keeps every record it encodes (``CODEC_CHAIN_KEEP``), so a hop skips decoding
    what the hop before it encoded, as a worker's stages do with
    ``SWITCHBOARD_REUSE_ENCODED_RECORDS``; only the records that enter the chain are decoded
    in full, as only the inbound records are in one worker. That is the best case of the
    worker's reuse, whatever its setting: the chain bounds what a pipeline on these
    contracts can reach. Every copy gets an event id of its own, as every
    stage's record does: records with equal bytes would share one kept entry.
    """

    def __init__(self) -> None:
        self._codec = Codec(remember=CODEC_CHAIN_KEEP, remember_bytes=1 << 30)
        now = utcnow()
        self._event = ConversationEvent(
            event_id=str(uuid.uuid4()),
            conversation_id="bench-0",
            tenant="bench",
            content=f"{_QUESTIONS[0]} (turn 0)",
            sender="user-0@bench.test",
            metadata={TRACEPARENT: new_traceparent()},
            origin_created_at=now,
            created_at=now,
        )
        self.value = Codec().encode(self._event)  # not kept: the chain's entry is decoded
        self._copies = itertools.count(1)

    @property
    def reused(self) -> int:
        """Decodes served from a record this hop's codec encoded (``Codec.reused``)."""
        return self._codec.reused

    def __call__(self, data: bytes) -> bytes:
        record = self._codec.decode(data, ConversationEvent)
        update = {
            "event_id": f"{self._event.event_id}.{next(self._copies)}",
            "created_at": utcnow(),
        }
        return self._codec.encode(record.model_copy(update=update))


def bench_pipeline(
    *, conversations: int = 2000, turns: int = 3, workers: int = 1, timeout_s: float = 900.0
) -> dict[str, Any]:
    """CPU-bound: zero-latency engine and the outbox connector, against raw aiokafka chains
    with the same number of topic hops measured on the same broker in the same run: one chain
    per worker process, side by side (``parallel_chains_throughput``), so that both sides
    have the same number of Python processes on the machine's cores.

    A second chain, the *codec chain*, also decodes and re-encodes every record at every hop
    (``CodecHop``, reusing every record a hop encoded, so only the first hop decodes in full,
    as only the ingest stage does in one worker at best): the cost of the Avro and
    pydantic contracts alone, with none of the stages' work (state, changelog, idempotency,
    delivery). It bounds what any pipeline on these contracts can reach;
    ``codec_chain_ratio`` is its rate over the raw chain's.

    ``*_cpu_us_per_turn`` are CPU µs per turn (all five hops) of the workers, the broker and
    the chains' processes: where every side is CPU-bound, the ratio is about the chains'
    figure over the workers'.
    """

    def mutate(raw: dict[str, Any]) -> None:
        raw["engines"]["local"]["latency_s"] = 0.0

    lines = conversation_lines(conversations, turns)
    ours = _run(lines, workers=workers, timeout_s=timeout_s, mutate=mutate)
    directory = Path(tempfile.mkdtemp(prefix="switchboard-bench-raw-"))
    with EmbeddedStack(workers=0, data_dir=directory) as stack:
        brokers, partitions = stack.settings().kafka_brokers, stack.partitions
        raw = parallel_chains_throughput(
            brokers, len(lines), PIPELINE_HOPS, partitions, chains=workers, timeout_s=timeout_s
        )
        codec = parallel_chains_throughput(
            brokers,
            len(lines),
            PIPELINE_HOPS,
            partitions,
            chains=workers,
            codec=True,
            timeout_s=timeout_s,
        )
    return {
        "benchmark": "pipeline",
        "workers": workers,
        "hops": PIPELINE_HOPS,
        "raw_chains": max(1, workers),
        **ours,
        "raw_chain_turns_per_s": round(raw.records_per_s, 1),
        "raw_chain_cpu_us_per_turn": round(raw.cpu_us_per_record, 1),
        "codec_chain_turns_per_s": round(codec.records_per_s, 1),
        "codec_chain_cpu_us_per_turn": round(codec.cpu_us_per_record, 1),
        "codec_chain_reused": round(codec.reused or 0.0, 3),
        "codec_chain_ratio": round(codec.records_per_s / raw.records_per_s, 3),
        "ratio": round(ours["turns_per_s"] / raw.records_per_s, 3),
    }
