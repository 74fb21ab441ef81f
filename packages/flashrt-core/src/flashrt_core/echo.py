"""Live echo: a request's output copied to the worker's own stdout/stderr, line by line.

The container log is what the platform shows (and what runpod-flash streams to the user's console
while a job runs: docs/contracts.md, "Live output"). Each line goes out exactly as the user wrote
it, which is what lets the client drop the lines it already showed from the final ``stdout``. Lines
are written whole, one ``write`` each under one process-wide lock, so concurrent requests interleave
by line, never mid-line. A partial line is held until its newline, a short delay, or the request's
end.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .capture import encodable, real_stream

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TextIO

__all__ = ["LineEcho"]

#: A partial line older than this is written out by the flusher thread.
PARTIAL_FLUSH_S = 0.5
CUT_NOTICE = (
    "[flashrt] live echo of request {rid} cut after {size} characters; its stdout is kept\n"
)

_write_lock = threading.Lock()
_open: set[LineEcho] = set()
_open_lock = threading.Lock()
_flusher: threading.Thread | None = None


def _write(stream: TextIO, text: str) -> None:
    with _write_lock:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # the log is gone or closed: the response still has it
            pass


def _flush_loop() -> None:
    while True:
        time.sleep(PARTIAL_FLUSH_S / 2)
        with _open_lock:
            echoes = list(_open)
        now = time.monotonic()
        for echo in echoes:
            echo.flush_stale(now)


class LineEcho:
    """The echo of one request: a listener for :class:`~flashrt_core.capture.OutputBuffer`."""

    __slots__ = (
        "__weakref__",
        "_lock",
        "_partial",
        "_since",
        "_size",
        "_streams",
        "cut",
        "limit",
        "rid",
    )

    def __init__(
        self, limit: int, rid: str | None = None, *, streams: Callable[[int], TextIO] = real_stream
    ) -> None:
        self.limit = limit
        self.rid = rid or "-"
        self.cut = False
        self._size = 0
        self._partial: dict[int, str] = {}
        self._since = 0.0
        self._lock = threading.Lock()
        self._streams = streams

    def __call__(self, stream: int, text: str) -> None:
        if self.cut or not text:
            return
        with self._lock:
            self._size += len(text)
            if self._size > self.limit:
                self.cut = True
                self._partial.clear()
                _write(self._streams(2), CUT_NOTICE.format(rid=self.rid, size=self.limit))
                return
            held = self._partial.pop(stream, "")
            text = held + text
            end = text.rfind("\n") + 1
            if end:
                _write(self._streams(stream), encodable(text[:end]))
                text = text[end:]
            if text:
                if not self._partial:
                    self._since = time.monotonic()
                self._partial[stream] = text
        if text:
            self._register()

    def flush_stale(self, now: float) -> None:
        if self._partial and now - self._since >= PARTIAL_FLUSH_S:
            self.close()

    def close(self) -> None:
        """Write what is held (the request ended, or its partial line waited long enough)."""
        with self._lock:
            held, self._partial = self._partial, {}
        for stream, text in held.items():
            _write(self._streams(stream), encodable(text) + "\n")
        with _open_lock:
            _open.discard(self)

    def _register(self) -> None:
        global _flusher
        with _open_lock:
            _open.add(self)
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_loop, name="flashrt-echo", daemon=True)
                _flusher.start()
