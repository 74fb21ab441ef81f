"""Which executor takes new requests, and who takes over when it goes.

The spare, when one is ready, at once; otherwise a fresh executor, started with back-off only
if executors keep failing to start (:mod:`.launcher`). Meanwhile new requests wait, bounded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .process import ExecutorUnavailable

if TYPE_CHECKING:
    from .launcher import Launcher
    from .process import ExecutorProcess

__all__ = ["Serving"]

log = logging.getLogger("flashrt.supervisor")


class Serving:
    """The serving executor: set once the first is ready, replaced whenever it goes."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.executor: ExecutorProcess | None = None
        #: Why no executor is serving now (None while one is, or while starting the first).
        self.problem: str | None = None
        #: Times the serving executor was replaced, and by what: "spare" or "start".
        self.replacements = {"spare": 0, "start": 0}
        self.closing = False
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()  # set (and replaced) each time a start fails
        self._restarting: asyncio.Task[None] | None = None

    def serve(self, executor: ExecutorProcess) -> None:
        """``executor`` said hello: it takes new requests from now on."""
        self.executor = executor
        self.problem = None
        self._ready.set()
        self.launcher.fill_spare()

    async def wait(self) -> ExecutorProcess | None:
        """The serving executor, waiting (bounded) while one is being started; ``None`` at once
        when the last start failed, or when none started in time (:attr:`problem` says why)."""
        if self._ready.is_set():
            return self.executor
        if self.problem is not None:  # starts are failing: say why now, not after the limit
            return None
        waits = {
            asyncio.ensure_future(self._ready.wait()),
            asyncio.ensure_future(self._failed.wait()),
        }
        limit = self.launcher.start_limit()
        try:
            await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if self._ready.is_set():
            return self.executor
        if self.problem is None:
            self.problem = f"no executor started within {limit:g} s"
        return None

    def replace(self, executor: ExecutorProcess) -> None:
        """``executor`` goes: if it was serving, the spare takes over, else a fresh one starts."""
        if executor is not self.executor or self.closing:
            return
        spare = self.launcher.take_spare()
        if spare is not None:
            self.executor = spare
            self.replacements["spare"] += 1
            return
        self._ready.clear()
        if self._restarting is None or self._restarting.done():
            self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        backoff = self.launcher.backoff
        while not self.closing:
            spare = self.launcher.take_spare()  # one may have become ready meanwhile
            if spare is not None:
                self.replacements["spare"] += 1
                self.serve(spare)
                return
            delay = backoff.delay()
            if delay:
                log.warning("executors keep failing to start: next start in %.1f s", delay)
                await asyncio.sleep(delay)
            try:
                executor = await self.launcher.launch()
            except (ExecutorUnavailable, OSError) as exc:
                self.problem = str(exc)
                log.error("%s", exc)
                backoff.death()
                self._failed.set()  # wakes the requests waiting for this start
                self._failed = asyncio.Event()
                continue
            self.replacements["start"] += 1
            self.serve(executor)
            return

    def stop(self) -> None:
        self.closing = True
        if self._restarting is not None:
            self._restarting.cancel()
