"""A worker's Prometheus /metrics endpoint reports what its stages did."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from support.stacks import new_stack

from streams.embedded import find_free_port
from streams.replay import replay

pytestmark = pytest.mark.integration


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (in any order, among others)."""
    values = []
    for sample in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample.group(1)))
        if all(found.get(key) == value for key, value in labels.items()):
            values.append(float(sample.group(2)))
    assert values, f"{name}{labels} not exported"
    return sum(values)


def test_metrics_endpoint_counts_records_deliveries_dead_letters_and_latency(
    tmp_path: Path,
) -> None:
    port = find_free_port()
    stack = new_stack(tmp_path, "metrics", extra_env={"SWITCHBOARD_METRICS_PORT": str(port)})
    stack.start()
    try:
        stack.wait_ready(timeout_s=60)
        lines = [
            {"tenant": "m", "channel": "chat", "sender": f"u{i}@m.test", "content": "Hello"}
            for i in range(5)
        ] + [{"tenant": "m", "channel": "chat", "sender": "long@m.test", "content": "x" * 5000}]
        result = asyncio.run(replay(stack.settings(), lines, timeout_s=60))
        assert result.summary()["unaccounted"] == 0
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        stack.stop()
    assert _value(text, "switchboard_records_in_total", stage="ingest") >= 7  # + warm-up
    assert _value(text, "switchboard_deliveries_total", status="delivered") >= 6
    assert _value(text, "switchboard_deadletters_total", stage="ingest.preprocess") == 1
    assert _value(text, "switchboard_end_to_end_latency_seconds_count", channel="chat") >= 6
    assert _value(text, "switchboard_llm_latency_seconds_count", engine="local") >= 6
    # tokens by tenant, persona, engine and model (the local engine's model is local-kb)
    local = {"tenant": "m", "engine": "local", "model": "local-kb"}
    assert _value(text, "switchboard_llm_tokens_total", **local, kind="prompt") > 0
    assert _value(text, "switchboard_llm_tokens_total", **local, kind="completion") > 0
