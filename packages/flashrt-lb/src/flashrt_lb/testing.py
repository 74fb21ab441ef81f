"""Run a real ``flashrt-lb`` process on a loopback port: for tests, benchmarks and smoke checks.

Standard library only, so anything that drives the worker from outside can use it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

__all__ = ["WorkerProcess", "free_port"]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class WorkerProcess:
    """One ``python -m flashrt_lb`` subprocess on ``127.0.0.1``; a context manager that stops it.

    ``env`` is added to the current environment; ``PORT``, ``PORT_HEALTH`` (when
    ``health_port`` is true) and ``FLASHRT_LB_HOST`` are chosen here. Output goes to a file,
    read with :meth:`output` when a check fails.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        health_port: bool = False,
        command: Sequence[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.health_port = free_port() if health_port else None
        self.env = {**os.environ, **(env or {})}
        self.env.update({"PORT": str(self.port), "FLASHRT_LB_HOST": LOOPBACK})
        if self.health_port is not None:
            self.env["PORT_HEALTH"] = str(self.health_port)
        else:
            self.env.pop("PORT_HEALTH", None)
        self.command = list(command or [sys.executable, "-m", "flashrt_lb"])
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.ready_after_s: float | None = None
        fd, name = tempfile.mkstemp(prefix="flashrt-lb-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> WorkerProcess:
        """Spawn the process and return at once."""
        self.spawned_at = time.monotonic()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        try:
            self.proc = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdout=fd, stderr=subprocess.STDOUT
            )
        finally:
            os.close(fd)
        return self

    def ping(self, port: int | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        """One ``GET /ping``: (status, body). Raises ``OSError`` while nothing listens."""
        conn = http.client.HTTPConnection(LOOPBACK, port or self.port, timeout=timeout)
        try:
            conn.request("GET", "/ping")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait until the main port accepts connections."""
        self._poll(timeout, lambda status: True, "to listen", 0.02)

    def wait_ready(self, timeout: float = 60.0, *, poll_s: float = 0.02) -> tuple[int, bytes]:
        """Wait until ``/ping`` stops answering 204; return its final (status, body).

        :attr:`ready_after_s` then holds the seconds from spawn to that answer.
        """
        answer = self._poll(timeout, lambda status: status != 204, "to finish start-up", poll_s)
        self.ready_after_s = time.monotonic() - self.spawned_at
        return answer

    def _poll(
        self, timeout: float, done: Callable[[int], bool], what: str, poll_s: float
    ) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                status, body = self.ping(timeout=2.0)
            except OSError:
                pass
            else:
                if done(status):
                    return status, body
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"flashrt-lb did not manage {what} in {timeout} s:\n{self.output()}"
                )
            time.sleep(poll_s)

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError("the worker was not started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"flashrt-lb exited with {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return None if proc is None else proc.returncode

    def cleanup(self) -> None:
        """Stop the process and delete its log."""
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> WorkerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
