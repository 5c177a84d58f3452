"""The embedded stack as one object: broker, redis-server and N worker processes.

``switchboard up``, ``switchboard demo`` and the integration tests all run the pipeline this
way; the workers are ordinary ``switchboard worker`` processes pointed at the embedded servers,
exactly what production runs against Apache Kafka and Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streams.embedded import ManagedProcess, start_broker, start_redis
from streams.settings import Settings, default_config_path
from streams.topics import create_topics

__all__ = ["EmbeddedStack", "StackWorker", "config_variant"]

log = logging.getLogger(__name__)


def config_variant(
    directory: Path, change: Callable[[dict[str, Any]], None], *, base: Path | None = None
) -> Path:
    """Write ``base`` (default: the bundled config) with ``change`` applied to its parsed YAML
    as ``directory/switchboard.yaml``, and return that path (tests and benchmarks use it)."""
    raw = yaml.safe_load((base or default_config_path()).read_text(encoding="utf-8"))
    change(raw)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "switchboard.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@dataclass
class StackWorker:
    """One ``switchboard worker`` child process."""

    index: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        """True while the worker runs."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker (crash tests) and reap it."""
        if self.alive():
            self.process.kill()
        self.process.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the worker, then SIGKILL after ``timeout_s`` seconds."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class EmbeddedStack:
    """Broker + Redis + workers on loopback; use as a context manager or call start()/stop().

    Args:
        workers: Worker processes to start (0 = only the servers).
        data_dir: Where logs, outbox and table data go.
        topic_prefix: Topic prefix (tests pass a unique one).
        app_id: app id (consumer groups ``<app_id>.<stage>``, changelog prefix).
        config: YAML config for the workers (None = bundled default).
        extra_env: More environment for the workers.
        schema_registry_url: A Confluent-compatible Schema Registry for the workers and the
            stack's clients (None = Avro single-object encoding, no registry).
    """

    workers: int = 1
    data_dir: Path = Path("var")
    topic_prefix: str = "switchboard"
    app_id: str = "switchboard"
    config: Path | None = None
    partitions: int = 4
    broker_port: int | None = None
    redis_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    schema_registry_url: str | None = None
    broker: ManagedProcess | None = None
    redis: ManagedProcess | None = None
    worker_procs: list[StackWorker] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        """Directory of the servers' and workers' logs."""
        return self.data_dir / "logs"

    def settings(self) -> Settings:
        """Settings of a client of this stack (what the workers get through the environment)."""
        if self.broker is None or self.redis is None:
            raise RuntimeError("the stack is not started")
        return Settings(
            kafka_brokers=self.broker.address,
            redis_url=f"redis://{self.redis.address}/0",
            topic_prefix=self.topic_prefix,
            app_id=self.app_id,
            partitions=self.partitions,
            config=self.config,
            data_dir=self.data_dir,
            session_timeout_s=6.0,
            fetch_max_wait_ms=50,
            metrics_port=0,
            schema_registry_url=self.schema_registry_url,
        )

    def worker_env(self, index: int) -> dict[str, str]:
        """Environment of worker ``index``: this process's, plus ``settings()`` as
        ``SWITCHBOARD_*`` variables, its worker id ``worker-<index>`` (a restarted worker
        gets its partitions back: ``streams.assignor``), plus ``extra_env``."""
        env = {
            **os.environ,
            **self.settings().to_env(),
            "SWITCHBOARD_WORKER_ID": f"worker-{index}",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def start(self) -> EmbeddedStack:
        """Start the servers, create the topics, start the workers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = start_broker(self.broker_port, log_dir=self.log_dir)
            self.redis = start_redis(self.redis_port, log_dir=self.log_dir)
            asyncio.run(create_topics(self.settings()))
            for index in range(self.workers):
                self.start_worker(index)
        except BaseException:
            self.stop()  # no orphaned servers when a later step fails
            raise
        return self

    def start_worker(self, index: int, env: dict[str, str] | None = None) -> StackWorker:
        """Start (or restart) worker ``index``; its log goes to ``logs/worker-<index>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{index}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker"],
                env=env or self.worker_env(index),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        worker = StackWorker(index, proc, log_path)
        self.worker_procs = [w for w in self.worker_procs if w.index != index] + [worker]
        return worker

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Block until a warm-up message went through the whole pipeline; return seconds taken.

        The warm-up message (tenant ``_warmup``) is delivered like any other, so it also
        appears in the outbox. Consumer-group joins take a few seconds; waiting here keeps
        them out of the latency figures that follow.

        Raises:
            RuntimeError: a worker died, or the warm-up message was not answered in time.
        """
        from streams.replay import replay

        started = time.monotonic()
        line = {
            "tenant": "_warmup",
            "channel": "chat",
            "sender": "warmup@switchboard.local",
            "content": "ping",
            "conversation_id": f"_warmup-{os.getpid()}-{time.time_ns()}",
        }
        result = asyncio.run(
            replay(
                self.settings(),
                [line],
                timeout_s=timeout_s,
                on_progress=lambda *_: self.check_workers(),
            )
        )
        if result.summary()["unaccounted"]:
            raise RuntimeError(
                f"the pipeline did not answer within {timeout_s} s; see {self.log_dir}"
            )
        return time.monotonic() - started

    def check_workers(self) -> None:
        """Raise RuntimeError naming the log of any worker that exited."""
        for worker in self.worker_procs:
            if not worker.alive():
                raise RuntimeError(
                    f"worker {worker.index} exited with status {worker.process.returncode}; "
                    f"see {worker.log_path}"
                )

    def stop(self) -> None:
        """Stop the workers, then Redis, then the broker."""
        started = time.monotonic()
        for worker in self.worker_procs:
            worker.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.broker is not None:
            self.broker.stop()
        log.info("stack stopped in %.1f s", time.monotonic() - started)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
