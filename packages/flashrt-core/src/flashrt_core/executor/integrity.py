"""After each request: is what the executor relies on still intact? Microseconds, by design.

A request can break the interpreter for every later one (``sys.modules['cloudpickle'] = None``,
closed file descriptors, a replaced builtin, a CUDA context left unusable). The executor cannot
repair that, but it can notice it, answer, and exit so the supervisor starts a fresh one.
"""

from __future__ import annotations

import builtins
import os
import re
import select
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping

    from ..protocol import FunctionResponse

__all__ = ["Integrity", "cuda_context_lost"]

_CRITICAL_MODULES = (
    "asyncio",
    "base64",
    "builtins",
    "cloudpickle",
    "contextvars",
    "copyreg",
    "msgspec",
    "os",
    "pickle",
    "pluggy",
    "select",
    "socket",
    "sys",
    "threading",
)
_BUILTINS = ("__import__", "print", "open", "exec", "compile", "isinstance", "getattr")

#: Errors after which a CUDA context is unusable for the rest of the process's life.
_CUDA_FATAL = re.compile(
    r"CUDA error|device-side assert|illegal memory access|cudaErrorIllegalAddress"
    r"|CUBLAS_STATUS_(?:EXECUTION_FAILED|INTERNAL_ERROR)|CUDNN_STATUS_(?:EXECUTION_FAILED|INTERNAL_ERROR)"
    r"|unspecified launch failure|an illegal instruction was encountered"
)


def cuda_context_lost(response: FunctionResponse) -> str | None:
    """The reason to recycle when a failed request's error says the GPU context is gone."""
    if response.success or not response.error:
        return None
    match = _CUDA_FATAL.search(response.error)
    if match is None:
        return None
    return f"a request failed with {match.group(0)!r}: the CUDA context cannot be trusted"


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


#: Descriptors code replaces on purpose (``dup2`` of a log file or ``/dev/null`` onto them):
#: compared by identity. The others are only checked to be open, with one ``poll`` for all.
_REPLACEABLE = (0, 1, 2)


class _Descriptors:
    """Open, and (0, 1, 2) still the same file? One ``poll`` and three ``fstat``: about 3 µs."""

    def __init__(self, fds: Mapping[str, int]) -> None:
        self._names = {fd: what for what, fd in fds.items()}
        self._poll = select.poll()
        for fd in self._names:
            self._poll.register(fd, 0)  # no events asked for: only POLLNVAL (closed) comes back
        self._same = [(fd, _identity(fd)) for fd in self._names if fd in _REPLACEABLE]
        self._lock = threading.Lock()  # both lanes check: one poll object is one thread's

    def problem(self) -> str | None:
        with self._lock:
            events = self._poll.poll(0)
        for fd, mask in events:
            if mask & select.POLLNVAL:
                return f"a request closed {self._names[fd]} (file descriptor {fd})"
        for fd, ident in self._same:
            if ident is not None and _identity(fd) != ident:
                return f"a request closed or replaced {self._names[fd]} (file descriptor {fd})"
        if sys.__stdout__ is not None and sys.__stdout__.closed:
            return "a request closed the process's stdout"
        if sys.__stderr__ is not None and sys.__stderr__.closed:
            return "a request closed the process's stderr"
        return None


class Integrity:
    """What to compare after each request, recorded once the executor is ready."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel_fd: int,
        lane_fds: Mapping[str, int] | None = None,
    ) -> None:
        names = [n for n in _CRITICAL_MODULES if n in sys.modules]
        names += [n for n in sys.modules if n == "flashrt_core" or n.startswith("flashrt_core.")]
        self._module_names = names
        self._module_objects: list[Any] = [sys.modules[n] for n in names]
        self._builtin_objects: list[Any] = [getattr(builtins, n) for n in _BUILTINS]
        loop_fds: dict[str, int] = {}
        selector = getattr(loop, "_selector", None)
        if selector is not None:
            loop_fds["the event loop's selector"] = selector.fileno()
        for attr in ("_ssock", "_csock"):
            sock = getattr(loop, attr, None)
            if sock is not None:
                loop_fds[f"the event loop's wake-up socket {attr[1:]}"] = sock.fileno()
        fds = {"the channel": channel_fd, "stdout": 1, "stderr": 2, **(lane_fds or {})}
        self._fds = _Descriptors({**fds, **loop_fds})
        self._loop_fds = _Descriptors(loop_fds)

    def check(self) -> str | None:
        """``None`` when intact, else what is broken."""
        return self.interpreter_problem() or self._fds.problem()

    def interpreter_problem(self) -> str | None:
        """Modules and builtins only (under a µs): what the fast lane checks before answering."""
        # Lists compare item by item, identity first (modules and builtins have no __eq__):
        # the whole comparison runs in C.
        modules = list(map(sys.modules.get, self._module_names))
        if modules != self._module_objects:
            for name, module, expected in zip(
                self._module_names, modules, self._module_objects, strict=True
            ):
                if module is not expected:
                    return f"a request replaced or removed the module {name!r} in sys.modules"
        values = list(map(builtins.__dict__.get, _BUILTINS))
        if values != self._builtin_objects:
            for name, value, expected in zip(_BUILTINS, values, self._builtin_objects, strict=True):
                if value is not expected:
                    return f"a request replaced the builtin {name!r}"
        return None

    def descriptor_problem(self) -> str | None:
        """The descriptors: what the fast lane checks right after answering."""
        return self._fds.problem()

    def loop_intact(self) -> bool:
        return self._loop_fds.problem() is None
