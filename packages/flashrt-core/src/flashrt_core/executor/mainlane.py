"""The main thread as a lane for sync user code: used when free, so signal handlers work.

Two kinds of work reach it. The event loop thread hands it sync calls of the requests it runs
(:meth:`MainLane.try_run`, woken through a pipe). The supervisor sends simple requests straight
to it over the fast lane's socket, when nothing else is in flight (``on_fast`` reads them).
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable

__all__ = ["QUEUE_MAX", "QUICK_S", "MainLane"]

#: A whole request queues behind what the main thread has run for less than this (seconds);
#: past it, what queued is taken back and runs as the loop's.
QUICK_S = 0.002
#: At most this many whole requests queue for the main thread.
QUEUE_MAX = 64


class MainLane:
    """Runs one work item at a time on the thread that calls :meth:`serve_forever`."""

    def __init__(
        self,
        fast_fd: int | None = None,
        spin_s: float = 0.0,
        traffic_fd: int | None = None,
        expect_s: float = 0.0,
    ) -> None:
        self._items: collections.deque[Callable[[], None] | None] = collections.deque()
        #: Whole requests the loop thread queued (they run after the sync calls).
        self._requests: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        #: Occupied, or with work queued: a sync call goes to the pool instead.
        self.busy = False
        #: An item or fast-lane request runs now (also while it waits on the loop), since when.
        self._running = False
        self._since = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.fast_fd = fast_fd
        self._nested = False  # in wait_serving: a request is running, though the lane is free
        self.spin_s = spin_s
        #: Readable when the loop thread has frames to read: polling then stops, leaving the
        #: CPU and the GIL to it.
        self.traffic_fd = traffic_fd
        #: How long to poll when told a request is on its way (the fast lane's handler
        #: returns ``True``).
        self.expect_s = expect_s
        #: Called on the main thread when the fast lane's socket is readable.
        self.on_fast: Callable[[], bool] | None = None
        self._peek = _poller([fast_fd]) if fast_fd is not None else None

    @property
    def fds(self) -> dict[str, int]:
        """The descriptors it cannot work without (for the integrity check)."""
        fds = {"the main lane's wake-up pipe": self._wake_r}
        if self.fast_fd is not None:
            fds["the fast lane's channel"] = self.fast_fd
        return fds

    def try_run(self, item: Callable[[], None]) -> bool:
        """Queue ``item`` (a sync call) for the main thread if it is free; ``False`` when it
        is busy.

        A fast-lane request already waiting counts as busy: it was sent because the supervisor
        saw nothing else in flight, and must not wait behind a long sync call.
        """
        with self._lock:
            if self.busy or self._fast_waiting():
                return False
            self.busy = True
            self._items.append(item)
        self._wake()
        return True

    def try_run_request(self, item: Callable[[], None]) -> bool:
        """Queue ``item``, a whole simple request, for the main thread: when it is free, or
        behind what it has run for less than :data:`QUICK_S` (up to :data:`QUEUE_MAX`). Under
        load the main thread then runs request after request without a thread hop; one that
        turns out slow has what queued behind it taken back (:meth:`reclaim_stuck`).

        Only at the top: never inside a request that waits on the loop (:meth:`wait_serving`).
        """
        with self._lock:
            if self._nested or self._fast_waiting():
                return False
            if self.busy and (
                len(self._requests) >= QUEUE_MAX
                or (self._running and time.perf_counter() - self._since > QUICK_S)
            ):
                return False
            self.busy = True
            self._requests.append(item)
            running = self._running
        if not running:  # a running main thread looks at the queue when it is done
            self._wake()
        return True

    def reclaim_stuck(self) -> tuple[list[Callable[[], None]], float | None]:
        """Loop thread: the queued requests, taken back if what runs now has run past
        :data:`QUICK_S`; else nothing, and in how many seconds to ask again (``None``: no
        request is queued)."""
        with self._lock:
            if not self._requests:
                return [], None
            age = time.perf_counter() - self._since
            if not self._running or age < QUICK_S:
                return [], QUICK_S - age if self._running else QUICK_S
            taken = list(self._requests)
            self._requests.clear()
            self.busy = bool(self._items) or self._running
            return taken, None

    def _fast_waiting(self) -> bool:
        return bool(self.on_fast is not None and self._peek is not None and self._peek.poll(0))

    def _wake(self) -> None:
        # Full: a wake-up is already pending. Closed by a request: the integrity check after
        # its answer ends the process.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def serve_forever(self) -> None:
        """The main thread's life: run items and fast-lane requests until :meth:`stop`."""
        watched = [self._wake_r] if self.fast_fd is None else [self._wake_r, self.fast_fd]
        poller = _poller(watched)
        # The same while polling, and the loop thread's traffic.
        spinner = _poller(watched if self.traffic_fd is None else [*watched, self.traffic_fd])
        spin_until = 0.0
        answered = -1e9  # when the last fast-lane request was answered
        clock = time.perf_counter
        while True:
            events = (
                _spin(poller, spinner, self.traffic_fd, spin_until) if spin_until else poller.poll()
            )
            spin_until = 0.0
            for fd, mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    if not self._run_items():
                        return
                elif mask & (select.POLLNVAL | select.POLLERR | select.POLLHUP):
                    # User code closed the fast lane's socket (the integrity check saw it and the
                    # executor is exiting), or the supervisor is gone (so is fd 0: the loop
                    # thread ends the process). Stop watching it meanwhile.
                    poller.unregister(fd)
                    spinner.unregister(fd)
                elif self.on_fast is not None:
                    # Poll after this one only if it came quickly after the last answer: a
                    # caller sending back to back then finds us awake, and one that sends now
                    # and then costs no CPU.
                    quick = clock() - answered <= self.spin_s
                    if self._run_fast(self.on_fast):
                        spin_until = clock() + self.expect_s  # told a request is on its way
                        continue
                    answered = clock()
                    if quick:
                        spin_until = answered + self.spin_s

    def wait_serving(
        self, start: Callable[[], concurrent.futures.Future[Any]]
    ) -> concurrent.futures.Future[Any]:
        """Main thread, in a fast-lane request: ``start`` work on the loop, then wait for it,
        running the sync calls that reach the lane meanwhile (a plugin's, an instance build's).

        The lane is free before the work starts, so its first sync call cannot miss it.
        """
        with self._lock:
            self.busy = bool(self._items)
            self._nested = True
        poller = _poller([self._wake_r])
        try:
            future = start()
            future.add_done_callback(lambda _: self._wake())
            while not future.done():
                poller.poll()
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                if not self._run_items(nested=True):
                    self._items.append(None)  # stopping: serve_forever sees it afterwards
                    self._wake()
                    break
        finally:
            with self._lock:
                self.busy = True  # the request goes on
                self._nested = False
            if self._requests:
                self._wake()  # queued meanwhile: they run after it
        return future

    def _run_items(self, *, nested: bool = False) -> bool:
        """Run what is queued; ``False`` when told to stop. ``nested`` (inside a request
        waiting on the loop, which still counts as what runs): sync calls only, the queued
        requests wait for the top, or are taken back."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                elif self._requests and not nested:
                    item = self._requests.popleft()
                else:
                    self.busy = bool(self._requests) and not nested
                    return True
                if not nested:
                    self._running = True
                    self._since = time.perf_counter()
            if item is None:
                return False
            try:
                item()
            finally:
                if not nested:
                    self._running = False

    def _run_fast(self, handler: Callable[[], bool]) -> bool:
        with self._lock:
            self.busy = self._running = True
            self._since = time.perf_counter()
        try:
            return handler()
        finally:
            with self._lock:
                self._running = False
                queued = self.busy = bool(self._items or self._requests)
            if queued:
                self._wake()  # what was queued meanwhile runs next

    def wait_done(self) -> None:
        """Any thread: return once the main thread runs nothing (an item or a fast-lane
        request)."""
        while self._running:
            time.sleep(0.01)

    def stop(self) -> None:
        self._items.append(None)
        self._wake()


def _poller(fds: list[int]) -> select.poll:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller


def _spin(
    poller: select.poll, spinner: select.poll, traffic_fd: int | None, until: float
) -> list[tuple[int, int]]:
    """Poll without sleeping until ``until``, then sleep in ``poll`` as usual. Sleep at once
    when the loop thread has frames to read (the worker is busy: under load polling here would
    hold the GIL the loop thread needs)."""
    clock = time.perf_counter
    while clock() < until:
        events = spinner.poll(0)
        if events:
            mine = [event for event in events if event[0] != traffic_fd]
            if mine:
                return mine
            break
    return poller.poll()
