"""After each request: is what the executor relies on still intact? Microseconds, by design.

A request can break the interpreter for every later one (``sys.modules['cloudpickle'] = None``,
closed file descriptors, a replaced builtin, a CUDA context left unusable). The executor cannot
repair that, but it can notice it, answer, and exit so the supervisor starts a fresh one.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

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


class Integrity:
    """What to compare after each request, recorded once the executor is ready."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel_fd: int) -> None:
        names = [n for n in _CRITICAL_MODULES if n in sys.modules]
        names += [n for n in sys.modules if n == "flashrt_core" or n.startswith("flashrt_core.")]
        self._modules: list[tuple[str, Any]] = [(n, sys.modules[n]) for n in names]
        self._builtins = [(n, getattr(builtins, n)) for n in _BUILTINS]
        fds = {"the channel": channel_fd, "stdout": 1, "stderr": 2}
        selector = getattr(loop, "_selector", None)
        if selector is not None:
            fds["the event loop's selector"] = selector.fileno()
        for attr in ("_ssock", "_csock"):
            sock = getattr(loop, attr, None)
            if sock is not None:
                fds["the event loop's wake-up socket"] = sock.fileno()
        self._fds = [(what, fd, _identity(fd)) for what, fd in fds.items()]
        self._loop_fds = [item for item in self._fds if item[0].startswith("the event loop")]

    def check(self) -> str | None:
        """``None`` when intact, else what is broken."""
        modules = sys.modules
        for name, module in self._modules:
            if modules.get(name) is not module:
                return f"a request replaced or removed the module {name!r} in sys.modules"
        for name, value in self._builtins:
            if getattr(builtins, name, None) is not value:
                return f"a request replaced the builtin {name!r}"
        return self._fd_problem(self._fds)

    def loop_intact(self) -> bool:
        return self._fd_problem(self._loop_fds) is None

    @staticmethod
    def _fd_problem(fds: list[tuple[str, int, tuple[int, int] | None]]) -> str | None:
        for what, fd, ident in fds:
            if ident is not None and _identity(fd) != ident:
                return f"a request closed or replaced {what} (file descriptor {fd})"
        if sys.__stdout__ is not None and sys.__stdout__.closed:
            return "a request closed the process's stdout"
        if sys.__stderr__ is not None and sys.__stderr__.closed:
            return "a request closed the process's stderr"
        return None
