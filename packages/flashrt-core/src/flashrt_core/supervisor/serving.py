"""Which executors take new requests (the pool), which one a request goes to, and who takes over
when one goes.

``FLASHRT_EXECUTORS`` of them serve at once, so sync user code uses as many cores. A request
goes to the least-loaded one, except that a class instance lives where it was built: a request
naming an ``instance_id`` goes to the executor holding it (a new one is built on the
least-loaded). When an executor goes, the spare takes its place at once; otherwise a fresh one
starts, with back-off only if executors keep failing to start (:mod:`.launcher`). While none
serves, new requests wait, bounded, or fail at once naming why starts are failing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .spawning import ExecutorUnavailable

if TYPE_CHECKING:
    from .launcher import Launcher
    from .process import ExecutorProcess

__all__ = ["Serving"]

log = logging.getLogger("flashrt.supervisor")

#: Instances whose executor is remembered (each executor keeps FLASHRT_MAX_INSTANCES alive).
_MAX_PLACED = 100_000


class Serving:
    """The pool of serving executors, kept at its size."""

    def __init__(self, launcher: Launcher, size: int) -> None:
        self.launcher = launcher
        self.size = size
        #: The executors taking new requests, oldest first.
        self.pool: list[ExecutorProcess] = []
        #: Where each class instance lives (set when its first request is dispatched).
        self.affinity: dict[str, ExecutorProcess] = {}
        #: Why no executor is serving now (None while one is, or while starting the first).
        self.problem: str | None = None
        #: Times a serving executor was replaced, and by what: "spare" or "start".
        self.replacements = {"spare": 0, "start": 0}
        self.closing = False
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()  # set (and replaced) each time a start fails
        self._starting = 0
        self._filling: asyncio.Task[None] | None = None

    @property
    def executor(self) -> ExecutorProcess | None:
        """The oldest serving executor (the only one, with a pool of one)."""
        return self.pool[0] if self.pool else None

    def serve(self, executor: ExecutorProcess) -> None:
        """``executor`` said hello: it takes new requests from now on; the pool fills up."""
        self.pool.append(executor)
        self.problem = None
        self._ready.set()
        if len(self.pool) + self._starting < self.size:
            self.fill()
        else:
            self.launcher.fill_spare()

    @property
    def ready(self) -> bool:
        """An executor serves: :meth:`pick` one without waiting."""
        return self._ready.is_set()

    async def wait(self, instance: str | None = None) -> ExecutorProcess | None:
        """The executor for a request (holding ``instance``, else the least loaded), waiting
        (bounded) while none serves; ``None`` at once when the last start failed, or when
        none started in time (:attr:`problem` says why)."""
        if not self._ready.is_set():
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
            if not self._ready.is_set():
                if self.problem is None:
                    self.problem = f"no executor started within {limit:g} s"
                return None
        return self.pick(instance)

    def pick(self, instance: str | None = None) -> ExecutorProcess:
        if instance is not None:
            holder = self.affinity.get(instance)
            if holder is not None and holder in self.pool:
                return holder
        chosen = min(self.pool, key=_load)
        if instance is not None:
            self._place(instance, chosen)
        return chosen

    def holds(self, executor: ExecutorProcess, instance: str) -> None:
        """``executor`` answered for ``instance`` (an id it generated, maybe): it lives there."""
        if executor in self.pool:
            self._place(instance, executor)

    def _place(self, instance: str, executor: ExecutorProcess) -> None:
        affinity = self.affinity
        affinity.pop(instance, None)  # most recent last: the oldest go first past the bound
        affinity[instance] = executor
        if len(affinity) > _MAX_PLACED:  # executors drop idle instances; forget the oldest
            del affinity[next(iter(affinity))]

    def replace(self, executor: ExecutorProcess) -> None:
        """``executor`` goes: if it served, the spare takes its place, else a fresh one starts."""
        if executor not in self.pool or self.closing:
            return
        self.pool.remove(executor)
        self.affinity = {k: v for k, v in self.affinity.items() if v is not executor}
        spare = self.launcher.take_spare()
        if spare is not None:
            self.pool.append(spare)
            self.replacements["spare"] += 1
            return
        if not self.pool:
            self._ready.clear()
        self.fill()

    def fill(self) -> None:
        """Start executors in the background until the pool has its size."""
        if self.closing or len(self.pool) + self._starting >= self.size:
            return
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        backoff = self.launcher.backoff
        while not self.closing and len(self.pool) < self.size:
            spare = self.launcher.take_spare()  # one may have become ready meanwhile
            if spare is not None:
                self.replacements["spare"] += 1
                self.serve(spare)
                continue
            delay = backoff.delay()
            if delay:
                log.warning("executors keep failing to start: next start in %.1f s", delay)
                await asyncio.sleep(delay)
            missing = self.size - len(self.pool)
            self._starting = missing
            try:
                started = await asyncio.gather(
                    *(self.launcher.launch() for _ in range(missing)), return_exceptions=True
                )
            finally:
                self._starting = 0
            for outcome in started:
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, (ExecutorUnavailable, OSError)):
                        raise outcome
                    self._failed_start(outcome)
                elif self.closing:
                    outcome.kill("the worker is stopping")
                else:
                    self.replacements["start"] += 1
                    self.pool.append(outcome)
                    self.problem = None
                    self._ready.set()
        if self.pool:
            self.launcher.fill_spare()

    def _failed_start(self, exc: BaseException) -> None:
        self.problem = str(exc)
        log.error("%s", exc)
        self.launcher.backoff.death()
        self._failed.set()  # wakes the requests waiting for this start
        self._failed = asyncio.Event()

    def stop(self) -> None:
        self.closing = True
        if self._filling is not None:
            self._filling.cancel()


def _load(executor: ExecutorProcess) -> int:
    return executor.load
