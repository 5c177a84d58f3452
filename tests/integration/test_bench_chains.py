"""The pipeline benchmark's baseline: raw aiokafka chains, one process each, on a real broker."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time

import pytest

from streams.bench import parallel_chains_throughput, parallel_chains_windows, raw_chain_window
from streams.embedded import ManagedProcess, find_free_port


def test_one_chain_moves_every_record_through_its_hops(broker: ManagedProcess) -> None:
    brokers = f"127.0.0.1:{broker.port}"
    ready: list[float] = []
    window = asyncio.run(
        raw_chain_window(
            brokers, 300, 3, 2, value=b"v" * 50, ready=lambda: ready.append(time.monotonic())
        )
    )
    # the window closes only once the last of the 300 records was read from the final topic
    assert 0 < window.end - window.start < 60
    assert len(ready) == 1
    assert ready[0] <= window.start
    # moving 900 records costs this process CPU, and no more than the window's wall time
    assert 0 < window.cpu_s <= (window.end - window.start) * 1.05 + 0.02


def test_chains_run_side_by_side_in_processes_of_their_own(broker: ManagedProcess) -> None:
    brokers = f"127.0.0.1:{broker.port}"
    windows = parallel_chains_windows(brokers, 3_000, 2, 2, chains=3)

    assert len(windows) == 3
    starts = [w.start for w in windows]
    # lined up by the barrier: every chain sends its first record before any has finished
    assert max(starts) < min(w.end for w in windows)
    assert all(w.cpu_s > 0 for w in windows)  # each chain's own process's CPU
    assert multiprocessing.active_children() == []  # every process ended
    run = parallel_chains_throughput(brokers, 400, 2, 2, chains=2, codec=True)
    assert 0 < run.records_per_s < 1e7
    assert 0 < run.cpu_us_per_record < 1e6
    assert run.reused == 0.5  # of two hops, the second reuses every record the first encoded
    assert parallel_chains_throughput(brokers, 400, 2, 2, chains=1).reused is None


def test_a_failing_hop_ends_the_chain_with_its_error_instead_of_hanging(
    broker: ManagedProcess,
) -> None:
    def broken(value: bytes) -> bytes:
        raise ValueError("no such hop")

    brokers = f"127.0.0.1:{broker.port}"
    with pytest.raises(ValueError, match="no such hop"):
        asyncio.run(raw_chain_window(brokers, 50, 2, 2, transform=broken, timeout_s=30))


def test_a_chain_that_cannot_start_fails_the_run_with_its_error() -> None:
    nowhere = f"127.0.0.1:{find_free_port()}"
    with pytest.raises(RuntimeError, match="a raw chain failed: KafkaConnectionError"):
        parallel_chains_windows(nowhere, 10, 1, 1, chains=2, timeout_s=30)
    assert multiprocessing.active_children() == []


def test_a_chain_process_killed_mid_run_fails_the_run_instead_of_hanging(
    broker: ManagedProcess,
) -> None:
    brokers = f"127.0.0.1:{broker.port}"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = multiprocessing.active_children()
            if len(children) == 2:
                time.sleep(2.0)  # set up (~1 s) and moving records
                os.kill(children[0].pid or 0, signal.SIGKILL)
                killed.append(children[0].pid or 0)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    with pytest.raises(RuntimeError, match="exit code -9 and no result"):
        parallel_chains_windows(brokers, 400_000, 2, 2, chains=2, timeout_s=120)
    killer.join()
    assert len(killed) == 1
    assert multiprocessing.active_children() == []
