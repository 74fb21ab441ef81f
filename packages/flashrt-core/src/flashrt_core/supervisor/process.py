"""One executor process as the supervisor sees it: spawned, talked to, killed, described.

A fresh interpreter (``python -m flashrt_core.executor``, never a fork) in a process group of its
own. Its stdin is our end of the channel (:mod:`flashrt_core.channel`); a second socketpair is
the fast lane its main thread reads; its stdout and stderr are the worker's. Its pidfd, where
the kernel has them, says the moment it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, NamedTuple

from .. import channel as ch
from ..settings import settings_to_dict

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..settings import Settings

log = logging.getLogger("flashrt.supervisor")

__all__ = ["ExecutorProcess", "ExecutorSetup", "ExecutorUnavailable", "describe_exit"]


class ExecutorSetup(NamedTuple):
    """What start-up gives each executor: plugins registered in code (cloudpickled), the
    unpacked app's directory, the resource whose deployed QB handler it serves."""

    plugins: list[bytes]
    app_dir: str | None
    deployed_handler: str | None


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

    def send_setup(self, settings: Settings, contents: ExecutorSetup) -> None:
        """Its first frame: the worker's settings and ``sys.path``, and what start-up made."""
        frame = ch.Setup(
            settings=settings_to_dict(settings),
            sys_path=list(sys.path),
            plugins=contents.plugins,
            app_dir=contents.app_dir,
            deployed_handler=contents.deployed_handler,
        )
        with contextlib.suppress(OSError):  # a dead executor is reported through its hello
            self.chan.send(frame)

    def watch(
        self,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[ExecutorProcess, ch.Channel], None],
        on_exit: Callable[[ExecutorProcess], None],
    ) -> None:
        """Have ``loop`` call back when a socket has data and the moment the process exits."""
        loop.add_reader(self.chan.fd, on_readable, self, self.chan)
        loop.add_reader(self.fast.fd, on_readable, self, self.fast)
        if self.pidfd is not None:  # without one (old kernels), EOF alone tells
            loop.add_reader(self.pidfd, on_exit, self)

    def unwatch_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.chan.fd)
        loop.remove_reader(self.fast.fd)

    def read(self, chan: ch.Channel) -> list[ch.Frame] | None:
        """The whole frames ``chan`` holds now; ``None`` at EOF (or a broken socket)."""
        try:
            data = chan.recv_available()
        except BlockingIOError:
            return []
        except OSError:
            return None
        return self.readers[chan.fd].feed(data) if data else None

    def drain(self) -> list[ch.Frame]:
        """What it sent before it went (an answer, an ``Exiting``): handled before mourning."""
        frames: list[ch.Frame] = []
        for chan in (self.fast, self.chan):
            for _ in range(1024):
                try:
                    data = chan.recv_available()
                except OSError:  # BlockingIOError included: nothing more
                    break
                if not data:
                    break
                frames += self.readers[chan.fd].feed(data)
        return frames

    async def stop(self, grace: float) -> None:
        """SIGTERM its group, SIGKILL it after ``grace`` seconds, and reap it."""
        self.exit_reason = self.exit_reason or "the worker is stopping"
        self.terminate_group()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), grace)
        except asyncio.TimeoutError:
            log.warning("executor %d ignored SIGTERM: killing it", self.proc.pid)
        self.kill("the worker is stopping")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 5)

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop watching it and close our ends (once)."""
        if self.dead:
            return
        self.unwatch_sockets(loop)
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
        self.close()

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
