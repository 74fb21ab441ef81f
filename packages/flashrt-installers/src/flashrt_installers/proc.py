"""A bounded, cancellable runner for installer commands.

Commands are argument lists (never a shell), run in their own session so that a timeout or a
cancelled request kills the whole process group (pip's build backends, dpkg's maintainer
scripts) instead of orphaning it. Only the end of the output is kept, so a chatty build cannot
fill memory, and the exit is noticed when the command itself ends, even if a grandchild it
started keeps the output pipe open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import re
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "STATS",
    "InstallError",
    "ProcResult",
    "ProcStats",
    "describe_failure",
    "is_transient_network_failure",
    "run_command",
    "run_with_retry",
]

#: Seconds a process group gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 3.0
#: Seconds to keep reading output after the command exited (a grandchild may hold the pipe).
DRAIN_AFTER_EXIT_S = 1.0

_TRANSIENT = re.compile(
    r"Temporary failure (?:in name resolution|resolving)"
    r"|Could not resolve (?:host|'?[\w.-]+'?)"
    r"|Name or service not known"
    r"|Connection (?:reset|refused|timed out|aborted)"
    r"|Network is unreachable"
    r"|(?:Read|Connect)TimeoutError|Max retries exceeded"
    r"|error sending request|operation timed out|dns error|tcp connect error"
    r"|Failed to download|HTTP status server error \(5\d\d"
    r"|Hash Sum mismatch|Unable to connect to"
    r"|\b50[234] (?:Bad Gateway|Service Unavailable|Gateway Time-?out)",
    re.IGNORECASE,
)


def is_transient_network_failure(output: str) -> bool:
    """Whether an installer's output shows a network failure worth one more try."""
    return _TRANSIENT.search(output) is not None


@dataclasses.dataclass(frozen=True)
class ProcResult:
    """How a command ended and the end of what it printed (stdout and stderr interleaved)."""

    argv: tuple[str, ...]
    returncode: int | None
    output: str
    seconds: float
    timed_out: bool = False
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """Exited 0 within its time limit."""
        return self.returncode == 0 and not self.timed_out


@dataclasses.dataclass
class ProcStats:
    """Process-wide diagnostics: how many installer commands started, and the last few."""

    started: int = 0
    recent: collections.deque[tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=64)
    )


#: Counts every command this module starts (``flashrt plugins`` and tests read it).
STATS = ProcStats()


class _Collector(asyncio.SubprocessProtocol):
    """Keeps the last ``limit`` bytes of output; resolves futures on exit and on pipe close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.limit = max(limit, 256)
        self.tail = bytearray()
        self.dropped = 0
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        self.tail += data
        extra = len(self.tail) - self.limit
        if extra > 0:
            del self.tail[:extra]
            self.dropped += extra

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        body = self.tail.decode("utf-8", "replace")
        if self.dropped:
            body = f"[... {self.dropped} earlier bytes of output dropped ...]\n" + body
        return body


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` (default: ours) with Python children unbuffered unless it says otherwise.

    A Python installer (pip) writing to a pipe buffers stdout but not stderr: its error lines
    would come before the stdout flushed at exit, and fall out of the kept tail.
    """
    child = dict(os.environ if env is None else env)
    child.setdefault("PYTHONUNBUFFERED", "1")
    return child


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def run_command(
    argv: Sequence[str],
    *,
    timeout_s: float,
    tail_bytes: int = 8192,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ProcResult:
    """Run ``argv`` to completion or until ``timeout_s``, killing its whole group on timeout.

    Cancelling the awaiting task kills the group too. Raises ``OSError`` when the program
    cannot be started (not found, not executable).
    """
    args = tuple(argv)
    loop = asyncio.get_running_loop()
    STATS.started += 1
    STATS.recent.append(args)
    start = time.monotonic()
    transport, proto = await loop.subprocess_exec(
        lambda: _Collector(loop, tail_bytes),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env=_child_env(env),
        cwd=cwd,
    )
    pid = transport.get_pid()
    timed_out = False
    try:
        try:
            await asyncio.wait_for(asyncio.shield(proto.exited), timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            _kill_group(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proto.exited), KILL_GRACE_S)
            except asyncio.TimeoutError:
                _kill_group(pid, signal.SIGKILL)
                await proto.exited
            _kill_group(pid, signal.SIGKILL)  # stragglers that ignored SIGTERM
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proto.closed), DRAIN_AFTER_EXIT_S)
    except BaseException:
        _kill_group(pid, signal.SIGKILL)
        transport.close()
        raise
    returncode = transport.get_returncode()
    transport.close()
    return ProcResult(
        argv=args,
        returncode=None if timed_out else returncode,
        output=proto.text(),
        seconds=time.monotonic() - start,
        timed_out=timed_out,
    )


async def run_with_retry(
    argv: Sequence[str],
    *,
    timeout_s: float,
    tail_bytes: int = 8192,
    env: Mapping[str, str] | None = None,
    retry_delay_s: float = 2.0,
) -> ProcResult:
    """:func:`run_command`, once more after ``retry_delay_s`` if it failed on the network."""
    first = await run_command(argv, timeout_s=timeout_s, tail_bytes=tail_bytes, env=env)
    if first.ok or first.timed_out or not is_transient_network_failure(first.output):
        return first
    await asyncio.sleep(retry_delay_s)
    second = await run_command(argv, timeout_s=timeout_s, tail_bytes=tail_bytes, env=env)
    return dataclasses.replace(second, seconds=first.seconds + second.seconds, attempts=2)


class InstallError(RuntimeError):
    """An install failed; the message names the packages and quotes the installer's output."""


def describe_failure(tool: str, packages: Sequence[str], result: ProcResult) -> str:
    """One message for a failed command: which tool, how it ended, what for, its output tail."""
    if result.timed_out:
        how = f"timed out after {result.seconds:.1f} s (its process group was killed)"
    else:
        how = f"failed with exit code {result.returncode} after {result.seconds:.1f} s"
    if result.attempts > 1:
        how += f" ({result.attempts} attempts)"
    tail = result.output.strip() or "(no output)"
    return f"{tool} {how} installing {', '.join(packages)}\n--- {tool} output (end) ---\n{tail}"
