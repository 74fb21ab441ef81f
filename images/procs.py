"""Subprocess and loopback-HTTP helpers shared by ``nox -s smoke`` and ``nox -s image``.

Every wait here is bounded; every failure is a :class:`SmokeError` whose message says which
command or endpoint failed and shows the tail of its output.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

PING_DEADLINE_S = 60.0


class SmokeError(Exception):
    """A smoke step failed; the message says which and why."""


class Timings:
    """Named steps, each printed with its duration as it ends."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.timings: list[tuple[str, float]] = []

    def note(self, text: str) -> None:
        print(f"[{self.prefix}]   {text}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"[{self.prefix}] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.timings.append((name, elapsed))
        print(f"[{self.prefix}] {name}: ok ({elapsed:.1f} s)", flush=True)

    def report(self) -> None:
        total = sum(elapsed for _, elapsed in self.timings)
        print(f"[{self.prefix}] timings: " + ", ".join(f"{n} {t:.1f} s" for n, t in self.timings))
        print(f"[{self.prefix}] all steps passed in {total:.1f} s")


def run(
    command: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise SmokeError with its output when it fails."""
    shown = " ".join(str(part) for part in command)
    try:
        done = subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SmokeError(f"`{shown}` did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise SmokeError(
            f"`{shown}` exited {done.returncode}:\n{tail(done.stdout)}\n{tail(done.stderr)}"
        )
    return done


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SmokeError(f"{name} is not on PATH (run this through `uv run --locked --`)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60.0
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ping_until_ready(port: int, process: subprocess.Popen[bytes]) -> list[int]:
    """Poll /ping from the moment the process starts until it answers 200; every answer seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + PING_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SmokeError(f"flashrt-lb exited {process.returncode} while starting")
        try:
            status, _ = request(port, "GET", "/ping", timeout=5.0)
        except (OSError, http.client.HTTPException):
            time.sleep(0.005)
            continue
        statuses.append(status)
        if status != 204:
            return statuses
        time.sleep(0.005)
    raise SmokeError(f"/ping did not answer 200 within {PING_DEADLINE_S:.0f} s: {statuses}")


def collapse(statuses: list[int]) -> list[int]:
    """Runs of one status folded into one: [204, 204, 200] -> [204, 200]."""
    collapsed: list[int] = []
    for status in statuses:
        if not collapsed or collapsed[-1] != status:
            collapsed.append(status)
    return collapsed


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, as the platform stops a container; SIGKILL the group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode
