"""Keeping both ends of a lone fast-lane request awake: on a VM, waking a sleeping process costs
more (70-300 µs) than a trivial call and its round trip (~50 µs).

The worker side. The executor polls for a while after each answer and after an ``Expect``
(``executor.mainlane``); here the worker announces a request its shell is still reading, and
waits for a fast-lane answer without sleeping, as long as doing so keeps nothing else waiting.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from .. import channel as ch

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from .inflight import InFlight, Request
    from .process import ExecutorProcess
    from .serving import Serving

__all__ = ["QUICK_ANSWER_S", "SYNC_SPIN_S", "Awake"]

#: The longest the worker polls for a fast-lane answer with its event loop held.
SYNC_SPIN_S = 100e-6
#: A fast-lane answer that came within this (hand-over to answer, as the loop saw it) was
#: quick: the next is polled for with the loop held. Above ``SYNC_SPIN_S``: an answer that the
#: loop read, turning, counts as quick too.
QUICK_ANSWER_S = 200e-6

_EXPECT = ch.Expect()


class Awake:
    """Announces requests to idle executors, and waits for fast-lane answers without sleeping
    for up to ``spin_s`` (``FLASHRT_SPIN_US``; 0: never)."""

    def __init__(
        self,
        spin_s: float,
        loop: asyncio.AbstractEventLoop,
        inflight: InFlight,
        serving: Serving,
        on_frame: Callable[[ExecutorProcess, ch.Frame], None],
    ) -> None:
        self.spin_s = spin_s
        self.loop = loop
        self.inflight = inflight
        self.serving = serving
        self._on_frame = on_frame  # the supervisor's: a frame read here is handled as any other

    def announce(self) -> None:
        """A request is on its way (its caller is still reading it): if the executor it will
        go to sleeps, wake it now, so it polls for the request rather than wakes for it."""
        if self.inflight.requests or not self.spin_s or not self.serving.ready:
            return
        executor = self.serving.pick()
        if not executor.fast_ok or executor.load or executor.abandoned:
            return
        now = time.perf_counter()
        if now - executor.idle_since < self.spin_s or now - executor.expected_at < ch.EXPECT_POLL_S:
            return  # it polls still
        executor.expected_at = now
        with contextlib.suppress(OSError):  # it is dying: its death handling sees to it
            executor.fast.send(_EXPECT)

    def await_answer(self, executor: ExecutorProcess, request: Request) -> None:
        """``request``, alone in flight, went to ``executor``'s fast lane: its answer is due
        within microseconds. Read it here, without a trip through the event loop, whose
        wake-ups would cost more than the call.

        The loop is held for :data:`SYNC_SPIN_S` at most, and only when the last answer there
        was quick (:data:`QUICK_ANSWER_S`): what arrives meanwhile waits (a worker under load
        often has one request in flight at a time), and a slower answer means code that takes
        longer, or cores too busy to poll on. Then, up to ``spin_s``, the loop turns without
        sleeping (:meth:`_keep_turning`), so what arrives is served. Past it, or at EOF, the
        loop's reader takes over as for any request."""
        clock = time.perf_counter
        start = clock()
        quick = executor.fast_took <= QUICK_ANSWER_S
        until = start + min(self.spin_s, SYNC_SPIN_S) if quick else 0.0
        while not request.future.done() and clock() < until:
            if not executor.fast_ready():
                continue
            frames = executor.read(executor.fast)
            if frames is None:
                return  # it is going: the loop's reader sees the EOF too
            for frame in frames:
                self._on_frame(executor, frame)
        if not request.future.done() and self.spin_s > SYNC_SPIN_S:
            self._keep_turning(request, start + self.spin_s)

    def _keep_turning(self, request: Request, until: float) -> None:
        """Keep the event loop from sleeping until ``request`` is answered (its reader gets the
        answer), another request joins it, or ``until``: a sleeping worker wakes slowly."""
        if request.future.done() or len(self.inflight) > 1 or time.perf_counter() > until:
            return
        self.loop.call_soon(self._keep_turning, request, until)
