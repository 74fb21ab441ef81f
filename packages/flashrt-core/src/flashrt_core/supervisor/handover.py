"""Handing a request to an executor and taking it back: the load it puts on that executor, and
what happens when its caller stops waiting.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from .. import channel as ch
from .inflight import RETRIED_NOTE

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from ..settings import Settings
    from .inflight import InFlight, Request
    from .process import ExecutorProcess

__all__ = ["Handover", "release"]

log = logging.getLogger("flashrt.supervisor")


def _flush(chan: ch.Channel) -> None:
    with contextlib.suppress(OSError):  # it is dying: its death handling retries or answers
        chan.flush()


def release(rid: int, request: Request) -> None:
    """The request no longer occupies its executor (answered, or given up on)."""
    if request.executor is not None:
        request.executor.release(rid)


class Handover:
    """Sends requests to executors, and gives up on them."""

    def __init__(
        self,
        settings: Settings,
        inflight: InFlight,
        loop: asyncio.AbstractEventLoop,
        retire: Callable[[ExecutorProcess, str], None],
    ) -> None:
        self.settings = settings
        self.inflight = inflight
        self.loop = loop
        self._retire = retire  # an executor we decided must go (its code ran away)

    def send(self, executor: ExecutorProcess, rid: int, request: Request) -> None:
        """Hand ``request`` to ``executor`` and start its time limit."""
        request.attempts += 1
        request.executor = executor
        executor.assign(rid)
        chan = executor.chan
        if request.deployed:
            frame: ch.Frame = ch.RunDeployed(
                rid,
                request.body,
                request.request_id,
                request.on_item is not None,
                request.max_item_bytes,
            )
        else:
            # A retry says so before its stdout (its side effects may have happened twice); the
            # executor adds it, so the answer's JSON is made once, there.
            note = RETRIED_NOTE if request.attempts > 1 else None
            frame = ch.Execute(rid, request.body, request.form, request.request_id, note=note)
        try:
            if chan.post(frame):
                # Frames handed over in this turn of the event loop leave in one write: under
                # load one wake-up of the executor carries many requests.
                self.loop.call_soon(_flush, chan)
        except OSError:
            return  # it is dying: its death handling retries or answers this request
        self.inflight.arm(rid, request)

    def give_up(self, rid: int, request: Request, stop: bool = True) -> None:
        """The caller stopped waiting: tell the executor; with ``stop``, watch that it really
        stops (else a sync call runs to its end, its result dropped)."""
        self.inflight.remove(rid)
        release(rid, request)
        executor = request.executor
        if executor is None or executor.dead:
            return
        with contextlib.suppress(OSError):
            executor.chan.send(ch.Cancel(rid))
        runaway = (lambda: self._runaway(executor)) if stop else None
        executor.abandon(rid, self.settings.hard_timeout_grace_s, runaway)

    def _runaway(self, executor: ExecutorProcess) -> None:
        if executor.dead:
            return
        grace = self.settings.hard_timeout_grace_s
        reason = (
            f"a request's code kept running {grace:g} s past its time limit; the executor was "
            "recycled to stop it"
        )
        log.warning("%s", reason)
        self._retire(executor, reason)
        executor.kill(reason)
