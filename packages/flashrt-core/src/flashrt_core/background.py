"""Work run as tasks of its own: a runtime's off every request's path (cache persistence,
plugins' own tasks), a supervisor's retries of what a dead executor had.

A task nobody holds can be garbage-collected mid-flight and its failure is never seen, so each
is kept referenced until it ends, its failure logged; its owner may wait for the rest (bounded).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import capture

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["Background"]

log = logging.getLogger("flashrt.runtime")


class Background:
    """The tasks running off the request path, until each ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``awaitable`` as a task of its own, outside any request's output capture."""

        async def runner() -> Any:
            capture.use_buffer(None)  # it belongs to no request: never capture its output
            return await awaitable

        task = asyncio.ensure_future(runner())
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for what still runs."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
