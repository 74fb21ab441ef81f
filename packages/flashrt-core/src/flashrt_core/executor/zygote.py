"""The zygote: a clean, single-threaded interpreter with the executor's imports done, that forks
each executor.

Starting an interpreter and importing flashrt, msgspec, pluggy, cloudpickle and the plugins costs
a quarter of a second of CPU; forking a process that already did costs a few milliseconds. So the
supervisor spawns this once (a fresh interpreter, never a fork of the worker, whose threads and
state a fork would copy) and asks it for every executor after the first: the spare, a
replacement, the executor of its own that a retried request runs on. Before it forks it can also
import the modules user code imported (``Preload``), so a recycled executor does not pay for
numpy or torch again. It never touches CUDA (importing torch does not initialise it).

It is the executors' child subreaper: what an executor's code starts and orphans (a daemon, a
child in a session of its own) is reparented here rather than to init, and reaped; the
supervisor ends those with the executor they came from
(:mod:`flashrt_core.supervisor.descendants`).

Its stdin is a ``SOCK_SEQPACKET`` socket, one :data:`~flashrt_core.zygote_frames.ZygoteFrame` a
message: ``Setup`` first, then ``Fork`` (the executor's two sockets attached) answered by
``Forked``, ``Preload``, and ``Reaped`` whenever a child of ours ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import sys
import warnings

from .. import channel as ch
from .. import zygote_frames as zf
from .carry import preload

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: What every executor imports before it can answer: done once here, inherited by each fork.
_EXECUTOR_MODULES = (
    "flashrt_core.executor.server",
    "flashrt_core.context",
    "flashrt_core.pipeline",
    "flashrt_core.plugins",
    "flashrt_core.capture",
    "flashrt_core.codecs",
    "flashrt_core.handler_loading",
    "flashrt_core.deployed_handler",
    "flashrt_core.builtin.executors",
    "cloudpickle",
)


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value)


def _warm(setup: ch.Setup) -> None:
    """Import what an executor needs, and the plugins it will load, before the first fork."""
    for entry in reversed(setup.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    for name in _EXECUTOR_MODULES:
        importlib.import_module(name)
    from ..plugins import get_plugin_manager
    from ..settings import Settings, settings_from_dict

    settings = settings_from_dict(Settings, setup.settings, isolation="none")
    with contextlib.suppress(Exception):  # a broken plugin is reported by the executor itself
        get_plugin_manager(settings)  # imports every entry-point plugin that is not blocked


class _Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
        self._wake_w = wake_w

    def send(self, frame: zf.ZygoteFrame) -> None:
        self.sock.send(zf.encode_zygote(frame))

    def serve(self) -> int:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self.wake_r, 512)
                elif not self._on_message():
                    return 0  # the supervisor is gone
            self._reap()

    def _on_message(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        except InterruptedError:
            return True
        if not data:
            return False
        frame = zf.decode_zygote(data)
        if isinstance(frame, zf.Fork):
            self._fork(frame.tag, fds)
        elif isinstance(frame, ch.Preload):
            preload(frame.modules)  # every later fork has them imported
        return True

    def _fork(self, tag: str, fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.send(zf.Forked(0, error=f"expected 1 socket, got {len(fds)}"))
            return
        try:
            pid = os.fork()
        except OSError as exc:
            pid = -1
            self.send(zf.Forked(0, error=f"fork failed: {exc}"))
        if pid == 0:
            try:
                self._become_executor(tag, fds[0])
            finally:
                os._exit(70)  # only reached if the executor could not even start
        for fd in fds:
            os.close(fd)
        if pid > 0:
            self.send(zf.Forked(pid))

    def _become_executor(self, tag: str, chan_fd: int) -> None:
        """In the fresh child: drop the zygote's ends, take the executor's fds, run it."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (self.wake_r, self._wake_w):
            os.close(fd)
        self.sock.close()
        os.setsid()  # its own session and group: what its code starts goes with it
        os.dup2(chan_fd, 0)
        os.close(chan_fd)
        os.environ[ch.EXECUTOR_TAG_ENV] = tag
        from .server import main as executor_main

        code = executor_main()
        from .answering import exit_now

        exit_now(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            with contextlib.suppress(OSError):
                self.send(zf.Reaped(pid, os.waitstatus_to_exitcode(status)))


def _read_setup(sock: socket.socket) -> ch.Setup | None:
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return None
        frame = zf.decode_zygote(data)
        if isinstance(frame, ch.Setup):
            return frame


def main() -> int:
    """Serve the supervisor until it closes the socket (or dies: we die with it)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # Forking after an import started threads (OpenBLAS does) is what the preload is for.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
    sock = socket.socket(fileno=0)
    os.set_inheritable(0, False)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the process's life
    setup = _read_setup(sock)
    if setup is None:
        return 0
    zygote = _Zygote(sock)
    try:
        _warm(setup)
    except Exception as exc:
        zygote.send(ch.Hello(os.getpid(), error=f"{type(exc).__name__}: {exc}"))
        return 1
    zygote.send(ch.Hello(os.getpid()))
    return zygote.serve()


if __name__ == "__main__":
    sys.exit(main())
