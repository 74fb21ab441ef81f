"""The main thread as a lane for sync user code: used when free, so signal handlers work."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MainLane"]


class MainLane:
    """Runs one work item at a time on the thread that calls :meth:`serve_forever`."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.busy = False

    def try_run(self, item: Callable[[], None]) -> bool:
        """Queue ``item`` for the main thread if it is free; ``False`` when it is busy."""
        with self._lock:
            if self.busy:
                return False
            self.busy = True
        self._items.put(item)
        return True

    def serve_forever(self) -> None:
        """The main thread's life: run items until :meth:`stop`."""
        while True:
            item = self._items.get()
            if item is None:
                return
            try:
                item()
            finally:
                with self._lock:
                    self.busy = False

    def stop(self) -> None:
        self._items.put(None)
