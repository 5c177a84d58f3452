"""Prometheus metrics of every stage, and the ``/metrics`` HTTP endpoint.

Names follow the Prometheus conventions (``_total`` counters, ``_seconds`` histograms).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from schemas.codec import Codec

__all__ = [
    "CONVERSATIONS_ENDED",
    "DEADLETTERS",
    "DELIVERIES",
    "DROPPED",
    "END_TO_END_LATENCY",
    "HISTORY_SHED",
    "LLM_COST",
    "LLM_IN_FLIGHT",
    "LLM_LATENCY",
    "LLM_OUTCOMES",
    "LLM_TOKENS",
    "RECORDS_IN",
    "RECORDS_OUT",
    "REQUEST_CONTENT_CUT",
    "REQUEST_HISTORY_TRIMMED",
    "STAGE_ERRORS",
    "child",
    "serve_metrics",
    "track_codec",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetricWrapperBase)


@functools.lru_cache(maxsize=8192)
def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, remembered: the client takes a lock and builds the label
    tuple on every ``labels()`` call, which the stages would otherwise pay per record.

    Children are never removed from these metrics, so a remembered child stays the one the
    registry exports.

    Raises:
        ValueError: the number of ``values`` differs from the metric's label names.
    """
    return metric.labels(*values)


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

RECORDS_IN = Counter("switchboard_records_in_total", "Records consumed by a stage.", ["stage"])
RECORDS_OUT = Counter(
    "switchboard_records_out_total", "Records produced by a stage.", ["stage", "topic"]
)
STAGE_ERRORS = Counter(
    "switchboard_stage_errors_total",
    "Errors raised while processing a record.",
    ["stage", "error_type"],
)
DEADLETTERS = Counter(
    "switchboard_deadletters_total", "Records sent to the dead-letter topic.", ["stage", "reason"]
)
DROPPED = Counter(
    "switchboard_dropped_total",
    "Records dropped on purpose (duplicates, stale LLM responses) and conversations pruned "
    '(reason "pruned").',
    ["stage", "reason"],
)
HISTORY_SHED = Counter(
    "switchboard_history_turns_shed_total",
    "Oldest history turns dropped from conversation states so that each state fits in one "
    "changelog record.",
)
REQUEST_HISTORY_TRIMMED = Counter(
    "switchboard_llm_request_messages_trimmed_total",
    "Oldest history messages left out of LLM requests so that each request fits the "
    "max.message.bytes of the LLM-requests topic (the conversation's state keeps them).",
)
REQUEST_CONTENT_CUT = Counter(
    "switchboard_llm_request_contents_cut_total",
    "LLM requests whose last message (the user turn) was cut at the end to fit the "
    "max.message.bytes of the LLM-requests topic (the conversation's state keeps it whole).",
)
END_TO_END_LATENCY = Histogram(
    "switchboard_end_to_end_latency_seconds",
    "From the inbound message's created_at to its delivery report.",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
)
LLM_LATENCY = Histogram(
    "switchboard_llm_latency_seconds",
    "Duration of each LLM engine call (one attempt, answered or failed, timeouts included); "
    "rate-limiter waits and retry backoff are not part of it.",
    ["engine"],
    buckets=_LATENCY_BUCKETS,
)
LLM_TOKENS = Counter(
    "switchboard_llm_tokens_total",
    "Tokens of LLM calls (kind prompt or completion), of every call whose response reported "
    "usage, answers rejected (blank, cut off, filtered) included.",
    ["tenant", "persona", "engine", "model", "kind"],
)
CONVERSATIONS_ENDED = Counter(
    "switchboard_conversations_ended_total", "Conversation sessions ended, by how.", ["status"]
)
LLM_IN_FLIGHT = Gauge("switchboard_llm_in_flight", "LLM calls in flight in this worker.")
LLM_COST = Counter(
    "switchboard_llm_cost_usd_total",
    "Cost of LLM calls in USD from llm.prices, over the same calls as "
    "switchboard_llm_tokens_total.",
    ["tenant", "persona", "model"],
)
LLM_OUTCOMES = Counter(
    "switchboard_llm_outcomes_total",
    "LLM turns by outcome (ok, fallback, failed, escalated) and engine.",
    ["persona", "engine", "status"],
)
DELIVERIES = Counter(
    "switchboard_deliveries_total", "Delivery outcomes.", ["channel", "connector", "status"]
)


class _CodecCollector(Collector):
    """Reads the codecs' own counts at scrape time, so decoding pays nothing for them."""

    def __init__(self) -> None:
        self.codecs: weakref.WeakSet[Codec] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        codecs = list(self.codecs)
        reused = CounterMetricFamily(
            "switchboard_codec_reused",
            "Records consumed that this worker had produced and still kept "
            "(SWITCHBOARD_REUSE_ENCODED_RECORDS), returned without decoding their bytes.",
        )
        reused.add_metric([], float(sum(c.reused for c in codecs)))
        yield reused
        kept = GaugeMetricFamily(
            "switchboard_codec_kept_records",
            "Records produced by this worker and kept for reuse now.",
        )
        kept.add_metric([], float(sum(c.remembered for c in codecs)))
        yield kept


_CODECS = _CodecCollector()
REGISTRY.register(_CODECS)


def track_codec(codec: Codec) -> None:
    """Export ``codec``'s reuse counts (``switchboard_codec_reused_total``,
    ``switchboard_codec_kept_records``) for as long as it lives."""
    _CODECS.codecs.add(codec)


def serve_metrics(port: int) -> None:
    """Expose the default registry on ``http://0.0.0.0:<port>/metrics`` (no-op when port is 0)."""
    if port:
        start_http_server(port)
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
