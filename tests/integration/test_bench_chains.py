"""The pipeline benchmark's baseline: raw aiokafka chains, one process each, on a real broker."""

from __future__ import annotations

import asyncio

import pytest

from streams.bench import parallel_chains_throughput, raw_chain_window
from streams.embedded import ManagedProcess


def test_one_chain_moves_every_record_through_its_hops(broker: ManagedProcess) -> None:
    brokers = f"127.0.0.1:{broker.port}"
    started, ended = asyncio.run(raw_chain_window(brokers, 300, 3, 2, value=b"v" * 50))
    # the window closes only once the last of the 300 records was read from the final topic
    assert 0 < ended - started < 60


def test_two_chains_run_side_by_side_in_processes_of_their_own(broker: ManagedProcess) -> None:
    brokers = f"127.0.0.1:{broker.port}"
    for codec in (False, True):
        rate = parallel_chains_throughput(brokers, 400, 2, 2, chains=2, codec=codec)
        assert 0 < rate < 1e7


def test_a_failing_hop_ends_the_chain_with_its_error_instead_of_hanging(
    broker: ManagedProcess,
) -> None:
    def broken(value: bytes) -> bytes:
        raise ValueError("no such hop")

    brokers = f"127.0.0.1:{broker.port}"
    with pytest.raises(ValueError, match="no such hop"):
        asyncio.run(raw_chain_window(brokers, 50, 2, 2, transform=broken, timeout_s=30))
