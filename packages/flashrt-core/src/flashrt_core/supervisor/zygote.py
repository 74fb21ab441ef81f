"""The worker's handle on the zygote (:mod:`flashrt_core.executor.zygote`): a fresh interpreter
with the executor's imports done, asked for each executor, which it forks in milliseconds.

It is spawned like an executor (a fresh interpreter, in a session of its own, dying with the
worker) and spoken to over a ``SOCK_SEQPACKET`` socketpair: ``Fork`` carries the executor's two
sockets and is answered by ``Forked`` in order; ``Reaped`` says a child of the zygote ended,
which is how the end of a forked executor, and its exit status, are known.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from .. import channel as ch
from .. import zygote_frames as zf
from ..settings import settings_to_dict
from .process import ExecutorProcess
from .spawning import ExecutorUnavailable, new_tag, sockets, spawn_module

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..settings import Settings

__all__ = ["Zygote"]

log = logging.getLogger("flashrt.supervisor")


class Zygote:
    """One zygote process, from spawn to stop. Made on the supervisor's loop."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        on_reaped: Callable[[int, int], None],
        on_gone: Callable[[Zygote], None],
    ) -> None:
        self.proc = proc
        self.sock = sock
        self._on_reaped = on_reaped
        self._on_gone = on_gone
        self.loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[ch.Hello] = self.loop.create_future()
        self._forks: collections.deque[asyncio.Future[int]] = collections.deque()
        self.dead = False
        self._stopping = False
        self.loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def spawn(
        cls,
        settings: Settings,
        on_reaped: Callable[[int, int], None],
        on_gone: Callable[[Zygote], None],
    ) -> Zygote:
        """Start it; :meth:`ready` waits until its imports are done."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = spawn_module("flashrt_core.executor.zygote", parent, child)
        parent.setblocking(False)
        zygote = cls(proc, parent, on_reaped, on_gone)
        setup = ch.Setup(settings=settings_to_dict(settings), sys_path=list(sys.path))
        zygote._send(setup)
        return zygote

    async def ready(self, timeout: float) -> None:
        """Wait for its hello; raise :class:`ExecutorUnavailable` saying why it cannot serve."""
        try:
            hello = await asyncio.wait_for(asyncio.shield(self.hello), timeout)
        except asyncio.TimeoutError:
            self.stop()
            raise ExecutorUnavailable(f"the zygote did not start within {timeout:g} s") from None
        if hello.error:
            self.stop()
            raise ExecutorUnavailable(f"the zygote could not start: {hello.error}")

    def _send(self, frame: zf.ZygoteFrame, fds: list[int] | None = None) -> None:
        data = zf.encode_zygote(frame)
        # Small messages on a local socket: they never block in practice, but never hang on it.
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        finally:
            self.sock.setblocking(False)

    async def fork(self, timeout: float) -> ExecutorProcess:
        """A fresh executor, forked; it waits for its ``Setup`` like a spawned one."""
        if self.dead or not self.hello.done():
            raise ExecutorUnavailable("the zygote is not serving")
        parent, child = sockets()
        tag = new_tag()
        waiter: asyncio.Future[int] = self.loop.create_future()
        try:
            try:
                self._send(zf.Fork(tag), [child.fileno()])
            except OSError as exc:
                raise ExecutorUnavailable(f"the zygote cannot be reached: {exc}") from None
            finally:
                child.close()
            self._forks.append(waiter)
            pid = await asyncio.wait_for(waiter, timeout)
        except BaseException:
            parent.close()
            raise
        return ExecutorProcess.forked(pid, parent, tag)

    def preload(self, modules: Mapping[str, str]) -> None:
        """Import these before the next fork (the user's imports, carried over)."""
        with contextlib.suppress(OSError):
            self._send(ch.Preload(dict(modules)))

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            frame = zf.decode_zygote(data)
            if isinstance(frame, zf.Reaped):
                self._on_reaped(frame.pid, frame.returncode)
            elif isinstance(frame, zf.Forked):
                if self._forks:
                    waiter = self._forks.popleft()
                    if waiter.done():
                        continue  # its caller gave up; the child reads EOF and exits
                    if frame.error:
                        waiter.set_exception(ExecutorUnavailable(frame.error))
                    else:
                        waiter.set_result(frame.pid)
            elif isinstance(frame, ch.Hello) and not self.hello.done():
                self.hello.set_result(frame)

    def _gone(self) -> None:
        if self.dead:
            return
        self.dead = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        reason = ExecutorUnavailable("the zygote process ended")
        if not self.hello.done():
            self.hello.set_exception(reason)
            self.hello.exception()
        while self._forks:
            waiter = self._forks.popleft()
            if not waiter.done():
                waiter.set_exception(reason)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        if not self._stopping:
            log.warning("the zygote process ended (%s)", self.proc.returncode)
        self._on_gone(self)

    def stop(self) -> None:
        """Kill it (it holds nothing) and close our end; forked executors are stopped first."""
        self._stopping = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._gone()
