"""The executor's main thread, lent to sync user code when it is free, so ``signal.signal``
works there (Python only lets the main thread set signal handlers).

The event loop runs in a thread of its own; this thread waits for one call at a time. A call
that finds it busy goes to the thread pool instead (:mod:`.synccalls`), so concurrent sync
calls still overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MainThread"]


class MainThread:
    """Runs one call at a time on the thread that calls :meth:`serve_forever`."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: A call was taken and has not finished: the next one goes to the pool.
        self.busy = False

    def try_run(self, call: Callable[[], None]) -> bool:
        """Queue ``call`` for the main thread if it is free; ``False`` when it is busy."""
        with self._lock:
            if self.busy:
                return False
            self.busy = True
        self._calls.put(call)
        return True

    def serve_forever(self) -> None:
        """The main thread's life: run calls until :meth:`stop`. Each call must
        :meth:`free` the thread once it has its result."""
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call()  # frees the thread itself, as soon as it has its result
            except BaseException:
                self.free()
                raise

    def free(self) -> None:
        """The call on the main thread has its result: a call handed over from now on may take
        the thread (called by the call itself, before it wakes the loop)."""
        with self._lock:
            self.busy = False

    def wait_done(self) -> None:
        """Any thread: return once the main thread runs nothing."""
        while self.busy:
            time.sleep(0.01)

    def stop(self) -> None:
        self._calls.put(None)
