"""``waldo serve`` in a child process on a free loopback port: for tests and benchmarks.

The server runs exactly as a user starts it (the CLI, uvicorn, a real socket), so what is
measured or tested is the real thing; this module only starts it, waits until it answers
``/healthz`` and stops it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from waldo.serve.metrics import process_memory_bytes

__all__ = ["ServerProcess", "free_port", "start_server"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """A running server: its base URL, its log file and the child process."""

    url: str
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def peak_memory_bytes(self) -> int | None:
        """The child's peak resident memory (Linux VmHWM), or None where unknown."""
        return process_memory_bytes("VmHWM", self.process.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (uvicorn drains and runs the lifespan's shutdown), SIGKILL if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - final class, Self needs 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(index: str | os.PathLike[str], log: str | os.PathLike[str], *extra_args: str,
                 timeout: float = 120.0) -> ServerProcess:
    """Start ``waldo serve --index INDEX`` on 127.0.0.1 and return once ``/healthz`` answers.

    Output goes to ``log`` (a file, not a pipe: an unread full pipe would stall the server).
    Raises RuntimeError with the log's text if the server exits or stays silent.
    """
    port = free_port()
    log = Path(log)
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "waldo.cli", "serve", "--index", os.fspath(index), "--host", "127.0.0.1",
             "--port", str(port), *extra_args],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ServerProcess(f"http://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"waldo serve exited with {process.returncode}:\n{server.log_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"waldo serve did not answer within {timeout:.0f} s:\n{server.log_text()}")
