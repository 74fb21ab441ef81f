"""One executor process as the supervisor sees it: started, talked to, killed, described.

Either a fresh interpreter (``python -m flashrt_core.executor``) or a fork of the zygote
(:mod:`flashrt_core.executor.zygote`), never a fork of the worker; in a session and process
group of its own either way. Its stdin is its end of the channel (:mod:`flashrt_core.channel`);
its stdout and stderr are the worker's. A spawned one's pidfd, where the kernel has them, says
the moment it exits; a forked one's end is reported by the zygote, its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .. import channel as ch
from ..settings import settings_to_dict
from .spawning import (
    ExecutorSetup,
    ExecutorUnavailable,
    ForkedChild,
    describe_exit,
    spawn_interpreter,
    worker_log_levels,
)

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from ..settings import Settings

log = logging.getLogger("flashrt.supervisor")

__all__ = ["ExecutorProcess"]


class ExecutorProcess:
    """One executor process and our end of its channel. Made on the supervisor's loop.

    It alone changes its fields: the supervisor's parts call its methods (:meth:`assign`,
    :meth:`release`, :meth:`abandon`, :meth:`settle`, :meth:`holds`, :meth:`retire`).
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | ForkedChild,
        chan: ch.Channel,
        pidfd: int | None,
        tag: str,
    ) -> None:
        self.proc = proc
        #: Its name in the environment of whatever its code starts (``EXECUTOR_TAG_ENV``).
        self.tag = tag
        self.chan = chan
        self.pidfd = pidfd
        self._reader = ch.FrameReader(chan.received)
        self.hello: asyncio.Future[ch.Hello] = asyncio.get_running_loop().create_future()
        self._exit_reason: str | None = None
        self.dead = False
        self.started = time.monotonic()
        self._requests: set[int] = set()
        #: Requests given up on whose code may still run here, each with the timer that
        #: recycles the executor if that code does not stop in time.
        self._abandoned: dict[int, asyncio.TimerHandle | None] = {}
        self._instances: set[str] = set()
        self._retry_of: int | None = None

    # --- what it holds ------------------------------------------------------------------------

    @property
    def load(self) -> int:
        """Requests handed to it and not answered yet."""
        return len(self._requests)

    @property
    def exit_reason(self) -> str | None:
        """Why it goes, once we (or it) decided it should; ``None`` while it serves."""
        return self._exit_reason

    @property
    def retry_of(self) -> int | None:
        """The retried request it runs alone, then goes (``None``: a serving executor)."""
        return self._retry_of

    @property
    def abandoned(self) -> int:
        """How many given-up requests may still run here."""
        return len(self._abandoned)

    @property
    def instances(self) -> int:
        """How many class instances it holds."""
        return len(self._instances)

    def greeted(self, hello: ch.Hello) -> None:
        """Its ``Hello`` arrived: whoever waits for it to start hears it."""
        if not self.hello.done():
            self.hello.set_result(hello)

    @property
    def failed_to_start(self) -> bool:
        """It died (or was killed) before its hello."""
        hello = self.hello
        return hello.done() and not hello.cancelled() and hello.exception() is not None

    def assign(self, rid: int) -> None:
        """Request ``rid`` was handed to it."""
        self._requests.add(rid)

    def release(self, rid: int) -> None:
        """Request ``rid`` no longer occupies it (answered, given up on, or lost)."""
        self._requests.discard(rid)

    def run_alone(self, rid: int) -> None:
        """It runs only the retried request ``rid``, then goes."""
        self._retry_of = rid

    def abandon(self, rid: int, grace: float, runaway: Callable[[], None] | None) -> None:
        """Its caller gave up on ``rid``: ``runaway`` (if any) runs when its code has not
        settled within ``grace`` seconds."""
        self._requests.discard(rid)
        handle = None
        if runaway is not None:
            handle = asyncio.get_running_loop().call_later(grace, self._runaway, rid, runaway)
        self._abandoned[rid] = handle

    def _runaway(self, rid: int, runaway: Callable[[], None]) -> None:
        self._abandoned.pop(rid, None)
        runaway()

    def settle(self, rid: int) -> bool:
        """The code of given-up request ``rid`` ended; ``False`` if it was not given up on."""
        if rid not in self._abandoned:
            return False
        handle = self._abandoned.pop(rid)
        if handle is not None:
            handle.cancel()
        return True

    def holds(self, instance_id: str) -> None:
        """It built (or used) the class instance ``instance_id``: lost if it dies."""
        if len(self._instances) < 10_000:  # only named in a death's error
            self._instances.add(instance_id)

    def lose_instances(self) -> list[str]:
        """It died: the instances that went with it, and no abandoned timer fires any more."""
        lost = sorted(self._instances)
        self._instances.clear()
        for handle in self._abandoned.values():
            if handle is not None:
                handle.cancel()
        self._abandoned.clear()
        return lost

    def retire(self, reason: str) -> bool:
        """It must go (on purpose, or we decided); the first reason is kept. ``True`` when
        this call decided it."""
        if self._exit_reason is not None:
            return False
        self._exit_reason = reason
        return True

    @property
    def ready(self) -> bool:
        """It said hello, has not been told to go, and is alive."""
        return (
            self.hello.done()
            and not self.hello.cancelled()
            and self.hello.exception() is None
            and self._exit_reason is None
            and not self.dead
        )

    @classmethod
    def spawn(cls) -> ExecutorProcess:
        """Start the interpreter; it reads its ``Setup`` from the channel when it is up."""
        proc, parent, pidfd, tag = spawn_interpreter()
        return cls(proc, ch.Channel(parent), pidfd, tag)

    @classmethod
    def forked(cls, pid: int, parent: socket.socket, tag: str) -> ExecutorProcess:
        """One the zygote forked: its end comes as the zygote's ``Reaped``."""
        return cls(ForkedChild(pid), ch.Channel(parent), None, tag)

    def send_setup(self, settings: Settings, contents: ExecutorSetup) -> None:
        """Its first frame: the worker's settings and ``sys.path``, and what start-up made."""
        frame = ch.Setup(
            settings=settings_to_dict(settings),
            log_levels=worker_log_levels(),
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
        on_readable: Callable[[ExecutorProcess], None],
        on_exit: Callable[[ExecutorProcess], None],
    ) -> None:
        """Have ``loop`` call back when a socket has data and the moment the process exits."""
        loop.add_reader(self.chan.fd, on_readable, self)
        if self.pidfd is not None:  # without one (old kernels), EOF alone tells
            loop.add_reader(self.pidfd, on_exit, self)
        elif isinstance(self.proc, ForkedChild):
            self.proc.ended.add_done_callback(lambda _: on_exit(self))

    def unwatch_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.chan.fd)

    def read(self) -> list[ch.Frame] | None:
        """The whole frames its channel holds now; ``None`` at EOF (or a broken socket)."""
        try:
            data = self.chan.recv_available()
        except BlockingIOError:
            return []
        except OSError:
            return None
        try:
            return self._reader.feed(data) if data else None
        except OSError:  # ChannelError included: its bytes make no sense
            return None

    def drain(self) -> list[ch.Frame]:
        """What it sent before it went (an answer, an ``Exiting``): handled before mourning."""
        frames: list[ch.Frame] = []
        for _ in range(1024):
            try:
                data = self.chan.recv_available()
            except OSError:  # BlockingIOError included: nothing more
                break
            if not data:
                break
            try:
                frames += self._reader.feed(data)
            except ch.ChannelError:
                break
        return frames

    async def stop(self, grace: float, reason: str = "the worker is stopping") -> None:
        """SIGTERM its group, SIGKILL it after ``grace`` seconds, and reap it."""
        self.retire(reason)
        self.terminate_group()
        try:
            await asyncio.wait_for(self._wait(), grace)
        except asyncio.TimeoutError:
            log.warning("executor %d ignored SIGTERM: killing it", self.proc.pid)
        self.kill(reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._wait(), 5)

    async def _wait(self) -> None:
        proc = self.proc
        if isinstance(proc, ForkedChild):
            await asyncio.shield(proc.ended)
        else:
            await asyncio.to_thread(proc.wait)

    def reap(self, timeout: float) -> None:
        """Wait (blocking, briefly) for a killed spawned one to be gone; a forked one is the
        zygote's to reap."""
        if isinstance(self.proc, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)

    def bury(self, loop: asyncio.AbstractEventLoop) -> None:
        """It is gone (or no use any more): make sure, stop watching it, and fail its hello if
        it never said one, so whoever started it reports why."""
        if self.proc.poll() is None:
            # EOF with the process alive (it closed its channel), or an exit event racing the
            # reaper: either way it is no use any more.
            self.kill("closed its channel")
            self.reap(timeout=5)
        self.forget(loop)
        if not self.hello.done():
            what = describe_exit(self.proc.returncode)
            self.hello.set_exception(
                ExecutorUnavailable(f"the executor process {what} while starting")
            )
            self.hello.exception()  # retrieved: whoever started it reports it

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop watching it and close our ends (once)."""
        if self.dead:
            return
        self.unwatch_sockets(loop)
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
        self.close()

    def kill(self, reason: str) -> None:
        """SIGKILL it and its process group; the first reason given is the one kept."""
        self.retire(reason)
        self._signal_group(signal.SIGKILL)
        if self.proc.poll() is None:  # never a pid the zygote has reaped (it may be reused)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def terminate_group(self) -> None:
        """SIGTERM its process group: the polite first step of a shutdown."""
        self._signal_group(signal.SIGTERM)
        if self.proc.poll() is None:
            # A fork may not have made its own group yet (setsid): it must hear it too.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def close(self) -> None:
        """Close our ends (after the loop stopped watching them)."""
        self.dead = True
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
        self.chan.close()
