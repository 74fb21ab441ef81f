"""One executor process as the supervisor sees it: spawned, talked to, killed, described.

A fresh interpreter (``python -m flashrt_core.executor``, never a fork) in a process group of its
own. Its stdin is our end of the channel (:mod:`flashrt_core.channel`); a second socketpair is
the fast lane its main thread reads; its stdout and stderr are the worker's. Its pidfd, where
the kernel has them, says the moment it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from . import channel as ch

__all__ = ["ExecutorProcess", "ExecutorUnavailable", "describe_exit"]


class ExecutorUnavailable(RuntimeError):
    """No executor could be started; the message says why."""


def describe_exit(returncode: int | None) -> str:
    """How a process ended, in the words the issue asks for."""
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


class ExecutorProcess:
    """One executor process and our ends of its two sockets. Made on the supervisor's loop."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        chan: ch.Channel,
        fast: ch.Channel,
        pidfd: int | None,
    ) -> None:
        self.proc = proc
        self.chan = chan
        #: The fast lane's socket, read by the executor's main thread (used when Hello says so).
        self.fast = fast
        self.fast_ok = False
        self.pidfd = pidfd
        self.readers = {chan.fd: ch.FrameReader(), fast.fd: ch.FrameReader()}
        self.hello: asyncio.Future[ch.Hello] = asyncio.get_running_loop().create_future()
        self.exit_reason: str | None = None  # set when we (or it) decided it should go
        self.dead = False
        self.started = time.monotonic()

    @classmethod
    def spawn(cls) -> ExecutorProcess:
        """Start the interpreter; it reads its ``Setup`` from the channel when it is up."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fast_parent, fast_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["FLASHRT_EXECUTOR"] = "1"
        env["FLASHRT_EXECUTOR_FAST_FD"] = str(fast_child.fileno())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flashrt_core.executor"],
                stdin=child.fileno(),
                pass_fds=(fast_child.fileno(),),
                close_fds=True,
                env=env,
                start_new_session=True,  # its own process group: we kill what it started too
            )
        except BaseException:
            fast_parent.close()
            parent.close()
            raise
        finally:
            child.close()
            fast_child.close()
        pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(proc.pid)
        return cls(proc, ch.Channel(parent), ch.Channel(fast_parent), pidfd)

    def kill(self, reason: str) -> None:
        """SIGKILL it and everything it started; the first reason given is the one kept."""
        if self.exit_reason is None:
            self.exit_reason = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def terminate_group(self) -> None:
        """SIGTERM its process group: the polite first step of a shutdown."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def close(self) -> None:
        """Close our ends (after the loop stopped watching them)."""
        self.dead = True
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
        self.chan.close()
        self.fast.close()
