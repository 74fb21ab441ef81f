"""How an executor process comes to be, and how its end is told: its socketpair and tag, a fresh
interpreter spawned, a forked one's exit status (its parent, the zygote, reports it), what
start-up hands it, and the words for how a process ended.

It holds no executor's state: :class:`~.process.ExecutorProcess` owns that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import NamedTuple

from .. import channel as ch

__all__ = [
    "ExecutorSetup",
    "ExecutorUnavailable",
    "ForkedChild",
    "describe_exit",
    "new_tag",
    "sockets",
    "spawn_interpreter",
    "worker_log_levels",
]

_tags = itertools.count(1)


def new_tag() -> str:
    """A name for one executor, unique on this machine: its descendants carry it."""
    return f"{os.getpid()}-{next(_tags)}-{os.urandom(4).hex()}"


class ForkedChild:
    """An executor the zygote forked: its parent, the zygote, reports its exit status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.ended = asyncio.get_running_loop().create_future()

    def poll(self) -> int | None:
        return self.returncode

    def exited(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            if not self.ended.done():
                self.ended.set_result(None)


class ExecutorSetup(NamedTuple):
    """What start-up gives each executor: plugins registered in code (cloudpickled), the
    unpacked app's directory, the resource whose deployed QB handler it serves."""

    plugins: list[bytes]
    app_dir: str | None
    deployed_handler: str | None


def worker_log_levels() -> dict[str, int]:
    """The levels of this process's ``flashrt`` loggers (``""``: the package's effective
    one), which executors take: they log what the worker would show. An embedder that never
    configured logging then gets no INFO lines (the timing line) on stderr behind its back."""
    levels = {"": logging.getLogger("flashrt").getEffectiveLevel()}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("flashrt.") and isinstance(logger, logging.Logger) and logger.level:
            levels[name] = logger.level
    return levels


class ExecutorUnavailable(RuntimeError):
    """No executor could be started; the message says why."""


def describe_exit(returncode: int | None) -> str:
    """How a process ended, as a failed request names it: its exit status or its signal."""
    if returncode is None:
        return "stopped answering"
    if returncode >= 0:
        return f"exited with status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return "killed by SIGKILL (out of memory?)"
    return f"killed by signal {number} ({name})"


def sockets() -> tuple[socket.socket, socket.socket]:
    """Our end and the executor's end of its channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def spawn_module(
    module: str, parent: socket.socket, child: socket.socket, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m module`` in a session of its own, ``child`` (its end of the channel) as its
    stdin; ``env`` adds to ours. ``child`` is closed here, and ``parent`` too if it fails."""
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=child.fileno(),
            close_fds=True,
            env={**os.environ, "FLASHRT_EXECUTOR": "1", **(env or {})},
            start_new_session=True,  # its own process group: we kill what it started too
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()


def spawn_interpreter() -> tuple[subprocess.Popen[bytes], socket.socket, int | None, str]:
    """A fresh ``python -m flashrt_core.executor``: the process, our end of its channel, its
    pidfd (where the kernel has them) and its tag."""
    parent, child = sockets()
    tag = new_tag()
    proc = spawn_module("flashrt_core.executor", parent, child, {ch.EXECUTOR_TAG_ENV: tag})
    pidfd: int | None = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(proc.pid)
    return proc, parent, pidfd, tag
