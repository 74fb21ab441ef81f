"""A shell's readiness: starting, then ready or failed with a reason, and nothing else.

The platform routes work by it (an HTTP worker's ``/ping`` is 204 while starting, 200 when ready,
and anything else takes it out of routing; a queue worker's jobs wait for it or fail with its
reason: docs/contracts.md, "HTTP"), so it must be honest: ready only once start-up finished,
failed with a reason a person can act on, and never back to starting. Each shell keeps one
:class:`Readiness`, the only writer of that state: it runs the shell's start-up once, as a task,
and turns the way the task ends into the phase.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Coroutine
    from typing import Any

__all__ = ["Phase", "Readiness", "StartupFailed"]

Phase = Literal["starting", "ready", "failed"]


class StartupFailed(Exception):
    """Start-up failed for a reason that is already the whole message.

    ``left_running``: the step left running in a thread that never ends (an import past the
    start-up limit), so the process must exit without joining its threads.
    """

    def __init__(self, reason: str, *, left_running: bool = False) -> None:
        super().__init__(reason)
        self.left_running = left_running

    def __str__(self) -> str:
        return str(self.args[0])


class Readiness:
    """One start-up and where it stands: ``starting`` -> ``ready`` | ``failed`` (with a reason).

    :meth:`begin` runs the start-up coroutine once, as a task on the running loop; meanwhile it
    says what it is doing (:meth:`doing`), for a caller that stops waiting. It ends ready when the
    coroutine returns (its string completes the ``ready:`` log line) and failed when it raises: a
    :class:`StartupFailed` (or one of ``reasons``) is the reason as it stands, anything else is
    named with its type, and cancellation (the worker stopping) says so.
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        doing: str = "starting",
        reasons: tuple[type[Exception], ...] = (),
    ) -> None:
        self._log = log
        self._reasons: tuple[type[Exception], ...] = (StartupFailed, *reasons)
        self._phase: Phase = "starting"
        self._reason: str | None = None
        self._doing = doing
        self._left_running = False
        self._task: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def reason(self) -> str | None:
        """Why start-up failed; ``None`` unless :attr:`phase` is ``failed``."""
        return self._reason

    @property
    def now_doing(self) -> str:
        """What start-up is doing now (while starting)."""
        return self._doing

    @property
    def left_running(self) -> bool:
        """Whether start-up left a step running in a thread that never ends, so the process must
        exit without joining its threads (:func:`flashrt_core.startup.exit_without_joining`)."""
        return self._left_running

    def doing(self, what: str) -> None:
        """Start-up moved on to ``what`` ("importing handler_x.py")."""
        self._doing = what

    # --- the start-up ----------------------------------------------------------------------

    def begin(self, start: Callable[[], Coroutine[Any, Any, str]]) -> asyncio.Task[None]:
        """Run ``start()`` as the start-up, once: later calls return the same task. Call it on
        the loop the start-up belongs to."""
        if self._task is None:
            self._done = asyncio.Event()
            self._task = asyncio.ensure_future(self._run(start))
        return self._task

    async def _run(self, start: Callable[[], Coroutine[Any, Any, str]]) -> None:
        assert self._done is not None
        try:
            summary = await start()
        except asyncio.CancelledError:
            self._fail("start-up was cancelled (the worker is stopping)")
            raise
        except self._reasons as exc:
            self._left_running = getattr(exc, "left_running", False)
            self._fail(str(exc), exc.__cause__)
        except Exception as exc:
            self._fail(f"start-up failed: {type(exc).__name__}: {exc}", exc)
        else:
            self._phase = "ready"
            self._log.info("ready: %s", summary)
        finally:
            self._done.set()

    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        self._phase = "failed"
        self._reason = reason
        self._log.error("not ready: %s", reason, exc_info=cause)

    async def wait(self, timeout: float | None = None) -> str | None:
        """Wait (at most ``timeout`` seconds) for the start-up :meth:`begin` began to finish:
        ``None`` when ready, else why not (its failure's reason, or, when the wait ran out,
        what it is still doing)."""
        assert self._done is not None, "wait() before begin()"
        if not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), timeout)
            except asyncio.TimeoutError:
                return f"worker start-up has not finished after {timeout:g} s: still {self._doing}"
        return self._reason

    async def stop(self) -> None:
        """Cancel an unfinished start-up and wait for it to end (it then reads failed)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if self._phase == "starting":  # cancelled before it ever ran
                self._fail("start-up was cancelled (the worker is stopping)")
                assert self._done is not None
                self._done.set()
