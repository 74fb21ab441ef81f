"""Handing a request to an executor and taking it back: which lane it goes by, the load it
puts on that executor, and what happens when its caller stops waiting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from .. import channel as ch

if TYPE_CHECKING:
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
    executor = request.executor
    if executor is not None:
        executor.load -= 1
        now = time.perf_counter()
        if not executor.load:
            executor.idle_since = now
        if executor.fast_rid == rid:
            executor.fast_rid = None  # an abandoned one keeps the lane closed until it ends
            executor.fast_took = now - executor.fast_sent


class Handover:
    """Sends requests to executors; counts them by lane."""

    def __init__(
        self,
        settings: Settings,
        inflight: InFlight,
        retire: Callable[[ExecutorProcess, str], None],
    ) -> None:
        self.settings = settings
        self.inflight = inflight
        self._retire = retire  # an executor we decided must go (its code ran away)
        #: Requests handed to executors, by lane: "fast" (its main thread) or "loop".
        self.lanes = {"fast": 0, "loop": 0}

    def send(self, executor: ExecutorProcess, rid: int, request: Request) -> bool:
        """Hand ``request`` to ``executor``; ``True`` when it went to its fast lane."""
        request.attempts += 1
        request.executor = executor
        executor.load += 1
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
            frame = ch.Execute(rid, request.body, request.form, request.request_id, request.simple)
            if (
                request.simple
                and executor.fast_ok
                and len(self.inflight) == 1
                and executor.load == 1
                and not executor.abandoned
            ):
                # Alone in flight, so its main thread is free and waiting on the answer costs
                # nothing else (under load, polling would take the CPU the others need).
                chan = executor.fast
                executor.fast_rid = rid
                executor.fast_sent = time.perf_counter()
        fast = chan is executor.fast
        self.lanes["fast" if fast else "loop"] += 1
        try:
            if fast:
                chan.send(frame)
            elif chan.post(frame):
                # Frames handed over in this turn of the event loop leave in one write: under
                # load one wake-up of the executor carries many requests.
                self.inflight.loop.call_soon(_flush, chan)
        except OSError:
            return False  # it is dying: its death handling retries or answers this request
        self.inflight.arm(rid, request)
        return fast

    def give_up(self, rid: int, request: Request) -> None:
        """The caller stopped waiting: tell the executor, and watch that it really stops."""
        release(rid, request)
        executor = request.executor
        if executor is None or executor.dead:
            return
        with contextlib.suppress(OSError):
            executor.chan.send(ch.Cancel(rid))
        executor.abandoned.add(rid)
        self.inflight.abandon(
            rid, self.settings.hard_timeout_grace_s, lambda: self._runaway(executor)
        )

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
