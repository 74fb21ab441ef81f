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
from collections.abc import Callable
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
REPLACED_MARKER = (
    "\n[flashrt: {count} character(s) that UTF-8 cannot encode were replaced by '?']\n"
)

_UNSET: Any = object()
_current: contextvars.ContextVar[OutputBuffer | None] = contextvars.ContextVar("flashrt_output")
_STAMP = "_flashrt_output"


#: Called with (stream, text) for everything a request writes: 1 is stdout, 2 is stderr.
Listener = Callable[[int, str], None]


class OutputBuffer:
    """A bounded, thread-safe text buffer; writes after :meth:`close` are dropped.

    ``listener`` sees every write as it happens, bound or not (the live echo and the executor's
    output stream); the buffer itself keeps at most ``limit`` characters for the response.
    """

    __slots__ = ("_limit", "_lock", "_parts", "_size", "_truncated", "closed", "listener")

    def __init__(self, limit: int, listener: Listener | None = None) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._truncated = False
        self._lock = threading.Lock()
        self.closed = False
        self.listener = listener

    def write(self, text: str, stream: int = 1) -> int:
        written = len(text)
        with self._lock:
            if self.closed:
                return written
            listener = self.listener
            if listener is not None:
                listener(stream, text)
            room = self._limit - self._size
            if len(text) > room:
                self._truncated = True
                text = text[: max(room, 0)]
            if text:
                self._parts.append(text)
                self._size += len(text)
        return written

    def getvalue(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            if self._truncated:
                text += TRUNCATION_MARKER.format(limit=self._limit)
        return encodable(text)

    def close(self) -> None:
        with self._lock:
            self.closed = True


def encodable(text: str, *, note: bool = True) -> str:
    """``text`` as UTF-8 can carry it: lone surrogates replaced, and a note saying so (unless
    ``note`` is false: a piece of a stream, whose whole carries the note)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "replace").decode("utf-8")
        if not note:
            return fixed
        count = sum(1 for a, b in zip(text, fixed, strict=False) if a != b and b == "?")
        return fixed + REPLACED_MARKER.format(count=count)
    return text


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

    def __init__(self, stream: TextIO, number: int) -> None:
        self._stream = stream
        self._number = number

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buf = current_buffer()
        if buf is None:
            # Output of no request (a finished request's thread): out at once, line by line, as
            # a terminal would show it. The process's stdout is block-buffered without
            # PYTHONUNBUFFERED, and an executor that is killed never flushes it.
            written = self._stream.write(text)
            if "\n" in text:
                self._stream.flush()
            return written
        return buf.write(text, self._number)

    def close(self) -> None:
        """Closing the process's stdout would break every later request: a no-op."""

    @property
    def closed(self) -> bool:
        return False

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
                buf.write(self.format(record) + "\n", 2)
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


def _router_for(stream: TextIO, number: int) -> _Router:
    found = _routers.get(id(stream))
    if found is None or found[0] is not stream:
        found = (stream, _Router(stream, number))  # the stream is kept too, so its id stays unique
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


def _usable(stream: Any, fallback: Any) -> Any:
    """``stream`` if it is one a request may write to, else the interpreter's original."""
    if isinstance(stream, _Router):
        return stream._stream
    if stream is None or getattr(stream, "closed", False) or not hasattr(stream, "write"):
        return fallback
    return stream


def _reinstall_routers() -> None:
    """A running request replaced a stream: the one starting now still gets captured output."""
    if not isinstance(sys.stdout, _Router):
        sys.stdout = _router_for(_saved["stdout"], 1)
    if not isinstance(sys.stderr, _Router):
        sys.stderr = _router_for(_saved["stderr"], 2)


def real_stream(number: int) -> TextIO:
    """The process's own stdout (1) or stderr (2), whatever the requests are doing."""
    saved = _saved.get("stdout" if number == 1 else "stderr")
    if saved is not None:
        return saved  # type: ignore[no-any-return]
    current = sys.stdout if number == 1 else sys.stderr
    fallback = sys.__stdout__ if number == 1 else sys.__stderr__
    return _usable(current, fallback)  # type: ignore[no-any-return]


def activate() -> None:
    """Install the routers (reference-counted: the first active request installs them)."""
    global _active
    with _lock:
        _active += 1
        if _active > 1:
            _reinstall_routers()
            return
        _saved["stdout"] = _usable(sys.stdout, sys.__stdout__)
        _saved["stderr"] = _usable(sys.stderr, sys.__stderr__)
        _saved["start"] = threading.Thread.start
        _saved["submit"] = ThreadPoolExecutor.submit
        sys.stdout = _router_for(_saved["stdout"], 1)
        sys.stderr = _router_for(_saved["stderr"], 2)
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
        # Whatever a request left in sys.stdout (None, its own object, a closed file), the
        # next one starts with the streams the process had.
        sys.stdout = _saved["stdout"]
        sys.stderr = _saved["stderr"]
        threading.Thread.start = _saved["start"]  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = _saved["submit"]  # type: ignore[method-assign]
        logging.getLogger().removeHandler(_handler)
        _saved.clear()
