"""When the next executor may start: at once, unless executors keep dying."""

from __future__ import annotations

import time

__all__ = ["Backoff"]

_WINDOW_S = 60.0
_MAX_S = 10.0


class Backoff:
    """Counts the deaths of the last minute; past two, each start waits twice as long."""

    def __init__(self) -> None:
        self._deaths: list[float] = []

    def death(self) -> None:
        self._deaths.append(time.monotonic())

    def delay(self) -> float:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _WINDOW_S]
        recent = len(self._deaths)
        return 0.0 if recent <= 2 else min(0.1 * 2 ** (recent - 3), _MAX_S)
