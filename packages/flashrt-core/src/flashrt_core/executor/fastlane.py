"""The fast lane: a simple request runs from frame to answer on the executor's main thread.

The supervisor sends a request over the fast lane's own socketpair only when nothing else is in
flight and the request needs no install and no modules, so the main thread is free. It decodes,
calls and answers without waking the event loop thread: one process wake-up each way, where the
loop would add two thread hops (loop → main thread → loop).

The pipeline is the same ``Runtime.execute_here`` coroutine, driven by hand: on this thread the
runtime runs blocking work inline (``Runtime.inline_thread``), so it finishes without waiting
on a loop. Async user code is the exception: it runs on the executor's event loop, where every
other request's async code runs, and the main thread waits for it (``Runtime.inline_wait``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..failures import stage_failure
from ..logs import request_id
from ..plugins import BUILTIN_PLUGINS
from ..protocol import FunctionRequest
from ..request_peek import is_simple
from .integrity import cuda_context_lost
from .scope import Scope, Streamer, current_scope, encode_response, exit_now, request_body

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine

    from ..protocol import FunctionResponse
    from ..runtime import Runtime
    from .server import ExecutorServer

__all__ = ["FastLane", "builtin_executors_only"]


def builtin_executors_only(runtime: Runtime) -> bool:
    """The fast lane runs only the built-in executors: a plugin's may need the event loop."""
    hook = runtime.pm.hook
    return all(
        impl.plugin_name in BUILTIN_PLUGINS
        for caller in (hook.flashrt_execute_function, hook.flashrt_execute_class)
        for impl in caller.get_hookimpls()
    )


class FastLane:
    """Reads the fast lane's socket and runs what arrives there, on the main thread."""

    def __init__(self, server: ExecutorServer, chan: ch.Channel) -> None:
        self.server = server
        self.chan = chan
        self.reader = ch.FrameReader()
        self.running: Scope | None = None
        self._base = contextvars.copy_context()  # each request starts from a fresh copy

    def attach(self) -> None:
        """Make the runtime run blocking work inline on the main thread."""
        runtime = self.server.runtime
        assert runtime is not None
        runtime.inline_thread = threading.main_thread().ident
        runtime.inline_wait = self.wait

    def on_readable(self) -> None:
        """Main thread: the supervisor sent something (or went away: the loop sees EOF too)."""
        try:
            data = self.chan.recv_available()
        except OSError:  # BlockingIOError included
            return
        for frame in self.reader.feed(data):
            if isinstance(frame, ch.Execute):
                try:
                    self._execute(frame)
                except Exception as exc:  # a bug of ours: answer, never leave the caller waiting
                    self._internal_error(frame.id, exc)

    def _internal_error(self, rid: int, exc: Exception) -> None:
        response = stage_failure("call", f"internal error in the fast lane: {exc!r}")
        with contextlib.suppress(OSError):
            self.server.chan.send(ch.Result(rid, encode_response(response)))

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
        loop = self.server.loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop)
        scope = current_scope.get()
        if scope is not None:
            scope.waiting = future
            if scope.cancelled:
                future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError from None
        finally:
            if scope is not None:
                scope.waiting = None

    def _execute(self, frame: ch.Execute) -> None:
        server = self.server
        try:
            request: Any = request_body(frame)
            if not isinstance(request, FunctionRequest):
                from ..protocol import decode_request

                request = decode_request(request)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            request = None
        if request is None or not is_simple(request.__getattribute__):
            # Not for this lane after all: the loop runs it (and reports a bad body).
            server.hand_to_loop(frame)
            return
        scope = Scope(frame.id)
        self.running = scope
        streamer = Streamer(self.chan, frame.id)
        try:
            response = self._base.copy().run(self._drive, scope, frame, request, streamer)
        finally:
            self.running = None
            streamer.flush()
        if response is None:
            if scope.cancelled:  # while waiting on the loop: the supervisor has answered
                with contextlib.suppress(OSError):
                    self.chan.send(ch.Settled(frame.id))
                return
            response = stage_failure("call", "the request's async code was cancelled")
        integrity = server.integrity
        assert integrity is not None
        reason = cuda_context_lost(response) or integrity.interpreter_problem()
        result = ch.Result(
            frame.id, encode_response(response), instance_id=response.instance_id, exiting=reason
        )
        try:
            self.chan.send(result)
        except OSError:  # the request closed our socket: fd 0 is out of its reach
            server.chan.send(result)
        # The descriptors are checked once the caller has its answer: a few µs it need not wait
        # for. A request the supervisor sends meanwhile runs again on the fresh executor.
        if reason is None and (reason := integrity.descriptor_problem()) is not None:
            with contextlib.suppress(OSError):
                server.chan.send(ch.Exiting(reason))
        if reason is not None:
            exit_now(0)

    def _drive(
        self, scope: Scope, frame: ch.Execute, request: FunctionRequest, streamer: Streamer
    ) -> FunctionResponse | None:
        current_scope.set(scope)
        request_id.set(frame.request_id)
        runtime = self.server.runtime
        assert runtime is not None
        return _run_to_end(runtime.execute_here(request, streamer, len(frame.body)))


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
