"""Ending everything an executor started, when it goes: nothing outlives its executor.

A process its code started is found two ways, read from ``/proc``:

- its **session**: each executor leads a session of its own, and a child stays in it (even after
  changing its process group, and after its parent died and it was reparented);
- its **tag**: each executor's environment names it (``FLASHRT_EXECUTOR_TAG``), and a subprocess
  inherits that, even one started in a session of its own (``start_new_session=True``).

Only a process that both leaves the session and runs with a cleared environment escapes; orphans
are reparented to the zygote (a child subreaper), which reaps them, never to init. A live
executor's background processes are left alone: this runs when one dies, is recycled, or the
worker stops. They get SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..channel import EXECUTOR_TAG_ENV

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable

    from .process import ExecutorProcess

__all__ = ["end", "end_soon", "find"]

_PROC = Path("/proc")


def _session(pid: str) -> int | None:
    """Its session, or ``None`` when it is gone or a zombie (dead, only awaiting its reaper)."""
    try:
        stat = (_PROC / pid / "stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return None if fields[0] in (b"Z", b"X") else int(fields[3])
    except (IndexError, ValueError):
        return None


def find(sessions: Iterable[int], tags: Iterable[str]) -> list[int]:
    """The live processes in any of ``sessions`` or whose environment carries one of ``tags``."""
    wanted = set(sessions)
    markers = [f"\0{EXECUTOR_TAG_ENV}={tag}\0".encode() for tag in tags]
    spared = {os.getpid(), os.getppid()}
    found: list[int] = []
    try:
        entries = [path.name for path in _PROC.iterdir()]
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) in spared:
            continue
        session = _session(entry)
        if session is None:
            continue
        if session in wanted or (markers and _tagged(entry, markers)):
            found.append(int(entry))
    return found


def _tagged(pid: str, markers: list[bytes]) -> bool:
    try:
        environ = b"\0" + (_PROC / pid / "environ").read_bytes()
    except OSError:
        return False
    return any(marker in environ for marker in markers)


def end(sessions: Iterable[int], tags: Iterable[str], grace: float) -> list[int]:
    """SIGTERM what :func:`find` finds, then SIGKILL what is left after ``grace`` seconds.

    Blocking (it sleeps through the grace period): run it off the event loop. Returns the pids
    it signalled.
    """
    sessions, tags = list(sessions), list(tags)
    targets = find(sessions, tags)
    if not targets:
        return []
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not find(sessions, tags):
            return targets
    for pid in find(sessions, tags):  # what is left (new ones too)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return targets


def end_soon(
    loop: asyncio.AbstractEventLoop, executors: Iterable[ExecutorProcess], grace: float
) -> asyncio.Future[list[int]]:
    """:func:`end` for these executors' descendants, in a thread (await it, or not)."""
    executors = list(executors)
    sessions = [executor.proc.pid for executor in executors]
    tags = [executor.tag for executor in executors]
    future = loop.run_in_executor(None, end, sessions, tags, grace)
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future
