"""The fast lane: a simple request runs from frame to answer on the executor's main thread.

The supervisor sends a request over the fast lane's own socketpair only when nothing else is in
flight and the request needs no install and no modules, so the main thread is free. It decodes,
calls and answers without waking the event loop thread: one process wake-up each way, where the
loop would add two thread hops (loop → main thread → loop).

The pipeline is the same :class:`~flashrt_core.pipeline.Pipeline` coroutine, driven by hand: on
this thread the lanes run blocking work inline (:meth:`Lanes.go_inline`), so it finishes without
waiting on a loop. Async user code, and an executor plugin's own awaitable, are the exception:
they run on the executor's event loop, where every other request's async code runs, and the
main thread waits for them (:meth:`Lanes.on_loop`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import threading
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..failures import stage_failure
from ..logs import request_id
from ..protocol import FunctionRequest, decode_request
from ..request_peek import is_simple
from ..timing import timings_for
from .mainlane import QUICK_S, MainLane
from .scope import Answers, Scope, Streamer, current_scope, encode_response, request_body

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from ..lanes import Lanes
    from ..pipeline import Pipeline
    from ..protocol import FunctionResponse
    from ..timing import Timings

__all__ = ["FastLane"]


class FastLane:
    """Reads the fast lane's socket and runs what arrives there, on the main thread."""

    def __init__(
        self,
        chan: ch.Channel,
        pipeline: Pipeline,
        lanes: Lanes,
        answers: Answers,
        loop: asyncio.AbstractEventLoop,
        hand_to_loop: Callable[[ch.Execute], None],
        main_lane: MainLane,
    ) -> None:
        self.chan = chan
        self.pipeline = pipeline
        self.answers = answers
        self.loop = loop
        self.hand_to_loop = hand_to_loop  # for a request that is not for this lane after all
        self.main_lane = main_lane
        self._reclaim: asyncio.TimerHandle | None = None  # checks the main thread's queue
        self.reader = ch.FrameReader()
        self.running: Scope | None = None
        self._base = contextvars.copy_context()  # each request starts from a fresh copy
        main = threading.main_thread().ident
        assert main is not None
        lanes.go_inline(main, self.wait)

    def on_readable(self) -> bool:
        """Main thread: the supervisor sent something (or went away: the loop sees EOF too).

        ``True`` when it said a request is on its way and none came yet: poll for it.
        """
        try:
            data = self.chan.recv_available()
        except OSError:  # BlockingIOError included
            return False
        expect = False
        for frame in self.reader.feed(data):
            if isinstance(frame, ch.Execute):
                self.run(frame, self.chan)
                expect = False
            elif isinstance(frame, ch.Expect):
                expect = True
        return expect

    def take(self, frame: ch.Execute, via: ch.Channel) -> bool:
        """Loop thread: run ``frame``, a simple request from the main channel, whole on the
        main thread when it is free or busy with something quick: no thread hop per request,
        where the loop's pipeline takes two (loop → main thread or pool → loop). ``False``: the
        loop runs it."""
        if not self.main_lane.try_run_request(functools.partial(self.run, frame, via)):
            return False
        if self._reclaim is None:
            self._reclaim = self.loop.call_later(QUICK_S, self._reclaim_stuck)
        return True

    def _reclaim_stuck(self) -> None:
        """Loop thread: requests queued behind one that turned out slow run as the loop's."""
        self._reclaim = None
        taken, wait = self.main_lane.reclaim_stuck()
        for item in taken:
            assert isinstance(item, functools.partial)  # made by take(): run(frame, via)
            self.hand_to_loop(item.args[0])
        if wait is not None:
            self._reclaim = self.loop.call_later(wait, self._reclaim_stuck)

    def run(self, frame: ch.Execute, via: ch.Channel) -> None:
        """Main thread: run ``frame`` here and answer on ``via``, the channel it came by (its
        output and answer then arrive in order). The loop thread hands over frames from the
        main channel this way while this thread is free: one thread hop, not two."""
        try:
            self._execute(frame, via)
        except Exception as exc:  # a bug of ours: answer, never leave the caller waiting
            self._internal_error(frame.id, exc)

    def _internal_error(self, rid: int, exc: Exception) -> None:
        response = stage_failure("call", f"internal error in the fast lane: {exc!r}")
        with contextlib.suppress(OSError):
            self.answers.chan.send(ch.Result(rid, encode_response(response)))

    def cancel(self, rid: int) -> bool:
        """Loop thread: the supervisor gave up on ``rid``; ``False`` when it is not ours."""
        scope = self.running
        if scope is None or scope.id != rid:
            return False
        scope.cancelled = True
        if scope.waiting is not None:
            scope.waiting.cancel()
        return True

    def wait(self, awaitable: Awaitable[Any]) -> Any:
        """Run async user code on the executor's loop and wait for it here."""
        scope = current_scope.get()

        def start() -> concurrent.futures.Future[Any]:
            future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop)
            if scope is not None:
                scope.waiting = future
                if scope.cancelled:
                    future.cancel()
            return future

        try:
            return self.main_lane.wait_serving(start).result()
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError from None
        finally:
            if scope is not None:
                scope.waiting = None

    def _execute(self, frame: ch.Execute, via: ch.Channel) -> None:
        try:
            request: Any = request_body(frame)
            if not isinstance(request, FunctionRequest):
                request = decode_request(request)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            request = None
        if request is None or not is_simple(request.__getattribute__):
            # Not for this lane after all: the loop runs it (and reports a bad body).
            self.hand_to_loop(frame)
            return
        scope = Scope(frame.id)
        self.running = scope
        streamer = Streamer(via, frame.id)
        timings = timings_for(self.answers.timing_log)
        try:
            response = self._base.copy().run(self._drive, scope, frame, request, streamer, timings)
        finally:
            self.running = None
            streamer.flush()
        if response is None:
            if scope.cancelled:  # while waiting on the loop: the supervisor has answered
                with contextlib.suppress(OSError):
                    via.send(ch.Settled(frame.id))
                return
            response = stage_failure("call", "the request's async code was cancelled")
        self.answers.send(via, frame.id, response, timings=timings)

    def _drive(
        self,
        scope: Scope,
        frame: ch.Execute,
        request: FunctionRequest,
        streamer: Streamer,
        timings: Timings,
    ) -> FunctionResponse | None:
        current_scope.set(scope)
        request_id.set(frame.request_id)
        return _run_to_end(self.pipeline.run(request, streamer, len(frame.body), timings))


def _run_to_end(coro: Coroutine[Any, Any, FunctionResponse]) -> FunctionResponse | None:
    """Step the pipeline until it returns; on this thread nothing in it waits on a loop.

    ``None`` when it was cancelled.
    """
    try:
        while True:
            if coro.send(None) is not None:  # a bare ``yield`` (sleep(0)) just steps again
                coro.close()
                return stage_failure(
                    "call", "internal error: the fast lane's pipeline waited on an event loop"
                )
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        return None


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
