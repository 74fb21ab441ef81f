"""After each request: is what the executor relies on still intact? Cheap, by design.

A request can break the interpreter for every later one (``sys.modules['cloudpickle'] = None``,
closed file descriptors, a replaced builtin, a CUDA context left unusable). The executor cannot
repair that, but it can notice it, answer, and exit so the supervisor starts a fresh one.

Before the answer leaves, only what the answer itself needs is checked (the critical modules,
flashrt's own, the builtins). After it, off the caller's path, every entry of ``sys.modules`` is
compared with the objects it held (:class:`ModuleBaseline`): one ``itemgetter`` call and one
tuple comparison, both in C, so the check grows with the number of modules loaded but never
runs Python code per module.
"""

from __future__ import annotations

import builtins
import operator
import os
import re
import select
import sys
import threading
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Mapping

    from ..protocol import FunctionResponse

__all__ = ["Integrity", "ModuleBaseline", "cuda_context_lost"]

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
    """Open, and (0, 1, 2) still the same file? One ``poll`` and three ``fstat``."""

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


_GONE = object()


def _location(value: Any) -> str | None:
    """Where a module came from: its spec's origin, or a namespace package's first directory."""
    try:
        spec = getattr(value, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if isinstance(origin, str):
            return origin
        for place in getattr(spec, "submodule_search_locations", None) or ():
            return str(place)
    except Exception:  # an object in sys.modules whose attributes raise
        pass
    return None


def _initialising(value: Any) -> bool:
    """Still being imported (by another thread, or by the code that put it there)."""
    try:
        return bool(getattr(getattr(value, "__spec__", None), "_initializing", False))
    except Exception:  # an object in sys.modules whose attributes raise
        return False


def _getter(names: list[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """``sys.modules`` → the objects of ``names``, as a tuple, in one C call."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    if names:
        only = names[0]
        return lambda modules: (modules[only],)
    return lambda modules: ()


def _poisoned(name: str, old: Any, new: Any) -> str | None:
    """Why replacing ``old`` by ``new`` at ``sys.modules[name]`` breaks later requests."""
    if new is None:
        return f"a request set sys.modules[{name!r}] to None"
    if not isinstance(new, types.ModuleType):
        return (
            f"a request replaced the module {name!r} in sys.modules with a "
            f"{type(new).__name__} object"
        )
    if isinstance(old, types.ModuleType):
        # ``del sys.modules[name]`` then ``import name``: a working module of the same file.
        location = _location(new)
        try:
            spec_name = getattr(getattr(new, "__spec__", None), "name", None)
        except Exception:
            spec_name = None
        if location is not None and spec_name == name and location == _location(old):
            return None
    return f"a request swapped the module {name!r} in sys.modules for another module object"


class ModuleBaseline:
    """Every entry of ``sys.modules`` and the object it held: what a request must not change.

    Poison is an entry that was there before and now holds ``None``, something that is not a
    module, or another module (unless that one is a fresh import of the same file: ``del`` then
    ``import`` leaves a working module). A deleted entry is forgotten, not poison. An entry that
    appears joins the baseline once its import, and its package's, has finished; never one
    whose file contains ``transient`` (a request's own ``modules``, which leave with it). Both
    lanes check, so the state is under a lock.
    """

    def __init__(self, transient: str = "") -> None:
        self._transient = transient
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._objects: tuple[Any, ...] = ()
        self._known: set[str] = set()
        self._get = _getter(self._names)
        self._expected = -1  # len(sys.modules) when nothing changed
        #: Every value of ``sys.modules``, in order, when the last look found it steady.
        self._snapshot: list[Any] | None = None
        self.rebase()

    def check(self) -> tuple[str | None, list[str]]:
        """The first poisoned entry (``None``: none), and the names that joined the baseline.

        Most requests change nothing: ``sys.modules`` then holds the very objects it held at
        the last look, in the same order (one list of its values, compared identity first: C
        speed, over twice as fast as looking the baseline's names up). Otherwise every entry of
        the baseline must still hold its object (one ``itemgetter`` call and a tuple
        comparison), and ``sys.modules`` have as many entries as then; failing that the changed
        entries are looked at one by one, and the new ones found by a set difference.
        """
        with self._lock:
            modules = sys.modules
            if self._snapshot is not None and len(modules) == self._expected:
                try:
                    if list(modules.values()) == self._snapshot:
                        return None, []
                except Exception:  # an odd object's __eq__: look closer
                    pass
            try:
                same = self._get(modules) == self._objects
            except Exception:  # KeyError (deleted), or an odd object's __eq__: look closer
                same = False
            if same and len(modules) == self._expected:
                self._steady(modules)
                return None, []
            now = dict(modules)
            if not same and (reason := self._compare(now)) is not None:
                return reason, []
            joined = self._join(now)
            self._steady(modules)
            return None, joined

    def _steady(self, modules: dict[str, Any]) -> None:
        """Take the values as they are for the next look, unless an import is under way (its
        entry is looked at again next time: the count differs)."""
        self._snapshot = list(modules.values()) if len(modules) == self._expected else None

    def rebase(self) -> None:
        """Take ``sys.modules`` as it is now: what flashrt itself imported is not poison."""
        with self._lock:
            self._names, self._objects, self._known = [], (), set()
            self._get = _getter(self._names)
            self._join(dict(sys.modules))
            self._steady(sys.modules)

    def _compare(self, now: dict[str, Any]) -> str | None:
        """Entry by entry: the first poisoned one; deleted ones leave the baseline."""
        names: list[str] = []
        objects: list[Any] = []
        for name, old in zip(self._names, self._objects, strict=True):
            new = now.get(name, _GONE)
            if new is _GONE:
                continue
            if new is not old and (reason := _poisoned(name, old, new)) is not None:
                return reason
            names.append(name)
            objects.append(new)
        self._names = names
        self._objects = tuple(objects)
        self._known = set(names)
        self._get = _getter(names)
        return None

    def _join(self, now: dict[str, Any]) -> list[str]:
        """Entries that appeared: those steady join the baseline."""
        joined: list[str] = []
        transient = 0
        for name in now.keys() - self._known:
            value = now[name]
            if not isinstance(name, str) or (
                self._transient and self._transient in (_location(value) or "")
            ):
                transient += 1  # not a module name; or a request's own, gone with it
                continue
            if self._unsteady(name, value, now):
                continue  # looked at again next time: the count differs
            joined.append(name)
        if joined:
            self._names += joined
            self._objects += tuple(now[name] for name in joined)
            self._known.update(joined)
            self._get = _getter(self._names)
        self._expected = len(self._names) + transient
        return joined

    @staticmethod
    def _unsteady(name: str, value: Any, now: Mapping[str, Any]) -> bool:
        """Its import, or its package's, is under way: it may still be replaced legitimately."""
        if _initialising(value):
            return True
        while "." in name:
            name = name.rpartition(".")[0]
            if _initialising(now.get(name)):
                return True
        return False


class Integrity:
    """What to compare after each request, recorded once the executor is ready.

    ``transient`` is the part of a path that marks a request's own ``modules`` directory: the
    modules there leave with their request, so they never join the baseline.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel_fd: int,
        lane_fds: Mapping[str, int] | None = None,
        transient: str = "",
    ) -> None:
        names = [n for n in _CRITICAL_MODULES if n in sys.modules]
        names += [n for n in sys.modules if n == "flashrt_core" or n.startswith("flashrt_core.")]
        self._module_names = names
        self._module_objects: list[Any] = [sys.modules[n] for n in names]
        self._builtin_objects: list[Any] = [getattr(builtins, n) for n in _BUILTINS]
        self._every_module = ModuleBaseline(transient)
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
        """Modules and builtins only: what is checked before an answer leaves."""
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
        """The descriptors: what is checked right after an answer left."""
        return self._fds.problem()

    def module_changes(self) -> tuple[str | None, list[str]]:
        """Every entry of ``sys.modules`` (after answering): what is poisoned, what appeared."""
        return self._every_module.check()

    def accept_modules(self) -> None:
        """After a preload: the entries its imports changed are the baseline now (an import that
        swaps another module's entry would otherwise retire every executor that preloads it)."""
        self._every_module.rebase()

    def loop_intact(self) -> bool:
        return self._loop_fds.problem() is None
