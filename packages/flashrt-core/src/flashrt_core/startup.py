"""A bound on the start-up steps that run a deployed app's code: one deadline, progress, a reason.

A deployed app's import and start-up (a model download and load) may take many minutes, or never
finish; without a bound the worker says "starting" forever and nothing says why. Each step runs
as a task the bound waits on rather than awaits, so a step that cannot be stopped (an import in a
thread) is left running, not waited for: the worker stops waiting, reports what was still starting,
and goes on serving what it can. While a step runs, a line every ``progress_s`` says what it is
and for how long, so a slow start-up is visible in the log long before the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["LIMIT_SETTING", "StartupBound", "StartupTimeout", "exit_without_joining"]

T = TypeVar("T")

#: The setting an operator raises when a start-up legitimately needs longer.
LIMIT_SETTING = "FLASHRT_STARTUP_TIMEOUT_S"


class StartupTimeout(Exception):
    """A start-up step was still running at the limit; the message names it and the limit."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An step left running may still fail later: its error is ours to drop, not asyncio's to log.
    if not task.cancelled():
        task.exception()


class StartupBound:
    """One deadline over a sequence of start-up steps, from this object's creation.

    ``limit_s`` 0 means no limit, ``progress_s`` 0 no progress lines.
    """

    def __init__(self, limit_s: float, progress_s: float, logger: logging.Logger) -> None:
        self.limit_s = limit_s
        self.progress_s = progress_s
        self.log = logger
        self.began = time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds since the bound began."""
        return time.monotonic() - self.began

    async def step(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (described by ``what``, e.g. "importing app.py") within the limit.

        Raises :class:`StartupTimeout` at the deadline, after cancelling the step (a thread it
        waits on keeps running; nobody waits for it). Cancelling the caller cancels the step.
        """
        task = asyncio.ensure_future(awaitable)
        step_began = time.monotonic()
        deadline = self.began + self.limit_s if self.limit_s > 0 else None
        next_line = step_began + self.progress_s if self.progress_s > 0 else None
        try:
            while True:
                now = time.monotonic()
                wake = min((t for t in (deadline, next_line) if t is not None), default=None)
                await asyncio.wait({task}, timeout=None if wake is None else max(0.0, wake - now))
                if task.done():
                    return task.result()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    task.add_done_callback(_retrieve)
                    task.cancel()
                    raise StartupTimeout(
                        f"start-up did not finish within {self.limit_s:g} s ({LIMIT_SETTING}): "
                        f"still {what}, for {now - step_began:.0f} s"
                    )
                if next_line is not None and now >= next_line:
                    self.log.info(
                        "start-up still running after %.0f s: %s, for %.0f s (limit: %s)",
                        now - self.began,
                        what,
                        now - step_began,
                        f"{self.limit_s:g} s" if self.limit_s > 0 else "none",
                    )
                    while next_line <= now:
                        next_line += self.progress_s
        except asyncio.CancelledError:
            task.cancel()
            raise


def exit_without_joining(code: int) -> NoReturn:
    """Flush the logs and streams, then end the process without joining its threads.

    For a shell whose start-up left a step running in a thread: that thread never ends, and a normal
    interpreter exit (which joins the thread pool's threads) would wait for it forever.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
