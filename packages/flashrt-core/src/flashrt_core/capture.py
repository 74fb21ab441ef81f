"""Per-request capture of stdout, stderr and log records, safe under concurrency.

A process has one ``sys.stdout``, so capture cannot swap it per request. Instead, while any
request runs, ``sys.stdout``/``sys.stderr`` are routers that send each write to the buffer of the
request whose code is writing, found through a context variable (which follows asyncio tasks and
the runtime's worker threads) or, for threads the user's code starts itself, through a stamp the
starting thread leaves on the new thread. Work submitted to any thread pool (the event loop's
default executor included) carries the submitter's buffer with it, because pool threads serve many
requests. With no request running, the original streams are back.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

__all__ = [
    "OutputBuffer",
    "activate",
    "clear_thread_stamp",
    "current_buffer",
    "deactivate",
    "use_buffer",
]

TRUNCATION_MARKER = "\n[flashrt: output truncated after {limit} characters]\n"

_UNSET: Any = object()
_current: contextvars.ContextVar[OutputBuffer | None] = contextvars.ContextVar("flashrt_output")
_STAMP = "_flashrt_output"


class OutputBuffer:
    """A bounded, thread-safe text buffer; writes after :meth:`close` are dropped."""

    __slots__ = ("_limit", "_lock", "_parts", "_size", "_truncated", "closed")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._truncated = False
        self._lock = threading.Lock()
        self.closed = False

    def write(self, text: str) -> int:
        with self._lock:
            if self.closed:
                return len(text)
            room = self._limit - self._size
            if len(text) > room:
                self._truncated = True
                text = text[: max(room, 0)]
            if text:
                self._parts.append(text)
                self._size += len(text)
        return len(text)

    def getvalue(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            if self._truncated:
                text += TRUNCATION_MARKER.format(limit=self._limit)
            return text

    def close(self) -> None:
        with self._lock:
            self.closed = True


def current_buffer() -> OutputBuffer | None:
    """The buffer of the request whose code runs here, if any."""
    buf = _current.get(_UNSET)
    if buf is _UNSET:
        buf = getattr(threading.current_thread(), _STAMP, None)
    if buf is None or buf.closed:
        return None
    return buf  # type: ignore[no-any-return]


def use_buffer(buffer: OutputBuffer | None) -> contextvars.Token[OutputBuffer | None]:
    """Route this context's output to ``buffer`` (``None``: explicitly no capture)."""
    return _current.set(buffer)


def reset_buffer(token: contextvars.Token[OutputBuffer | None]) -> None:
    _current.reset(token)


def clear_thread_stamp() -> None:
    """Thread-pool initializer: a pool thread belongs to no request until a task says so."""
    setattr(threading.current_thread(), _STAMP, None)


class _Router:
    """Stands in for ``sys.stdout``/``sys.stderr``; unknown attributes go to the real stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        buf = current_buffer()
        if buf is None:
            return self._stream.write(text)
        return buf.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if current_buffer() is None:
            self._stream.flush()

    def isatty(self) -> bool:
        return False if current_buffer() is not None else self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _LogHandler(logging.Handler):
    """Copies log records emitted by a request's code into that request's buffer."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("flashrt"):
            return
        buf = current_buffer()
        if buf is not None:
            try:
                buf.write(self.format(record) + "\n")
            except Exception:
                self.handleError(record)


_lock = threading.Lock()
_active = 0
_saved: dict[str, Any] = {}
_handler = _LogHandler()
#: One router per stream it wraps, kept for the life of the process. CPython's print() (before
#: 3.13) holds only a borrowed reference to sys.stdout: a router that deactivate() dropped while
#: another thread was printing through it would be freed mid-call, a segfault. Kept, it is not.
_routers: dict[int, tuple[TextIO, _Router]] = {}


def _router_for(stream: TextIO) -> _Router:
    found = _routers.get(id(stream))
    if found is None or found[0] is not stream:
        found = (stream, _Router(stream))  # the stream is kept too, so its id stays unique
        _routers[id(stream)] = found
    return found[1]


_original_start = threading.Thread.start
_original_submit = ThreadPoolExecutor.submit


def _stamping_start(self: threading.Thread) -> None:
    setattr(self, _STAMP, current_buffer())
    _saved.get("start", _original_start)(self)


def _capturing_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    # The task runs in a copy of the submitter's context with its buffer pinned (None included),
    # so a pool thread's own stamp, left by whichever request created it, is never consulted.
    ctx = contextvars.copy_context()
    ctx.run(_current.set, current_buffer())
    return _saved.get("submit", _original_submit)(self, ctx.run, fn, *args, **kwargs)


def activate() -> None:
    """Install the routers (reference-counted: the first active request installs them)."""
    global _active
    with _lock:
        _active += 1
        if _active > 1:
            return
        _saved["stdout"], _saved["stderr"] = sys.stdout, sys.stderr
        _saved["start"] = threading.Thread.start
        _saved["submit"] = ThreadPoolExecutor.submit
        sys.stdout = _router_for(sys.stdout)
        sys.stderr = _router_for(sys.stderr)
        threading.Thread.start = _stamping_start  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = _capturing_submit  # type: ignore[method-assign,assignment]
        logging.getLogger().addHandler(_handler)


def deactivate() -> None:
    """Undo :func:`activate` when the last active request ends."""
    global _active
    with _lock:
        _active -= 1
        if _active > 0:
            return
        # Restore only what is still ours: someone may have replaced a stream meanwhile.
        if isinstance(sys.stdout, _Router):
            sys.stdout = _saved["stdout"]
        if isinstance(sys.stderr, _Router):
            sys.stderr = _saved["stderr"]
        threading.Thread.start = _saved["start"]  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = _saved["submit"]  # type: ignore[method-assign]
        logging.getLogger().removeHandler(_handler)
        _saved.clear()
