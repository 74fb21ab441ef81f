"""Where code runs: the thread pool, blocking work, sync user code, and the inline mode.

It knows nothing of requests. One :class:`Lanes` per process: the in-process runtime's, or the
executor's, whose main thread is a lane for sync user code (``main_lane``) and, on its fast lane,
runs the whole pipeline itself (``go_inline``): there blocking work runs inline, since no event
loop runs on that thread, and awaitables that need a loop are handed to the executor's loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import capture

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["Lanes", "call_catching", "runs_inline", "settle", "steps_inline"]

T = TypeVar("T")
F = TypeVar("F", bound="Callable[..., Awaitable[Any]]")

#: Code objects of executor-hook coroutines that never need an event loop of their own: they
#: reach one only through ``Invocation.call`` (:meth:`Lanes.on_loop`), so a fast lane can step
#: them on its thread.
_INLINE_CODE: set[Any] = set()


def runs_inline(fn: F) -> F:
    """Mark an executor hook's coroutine function as safe to step without an event loop."""
    _INLINE_CODE.add(fn.__code__)
    return fn


def steps_inline(awaitable: Any) -> bool:
    """Whether ``awaitable`` is a coroutine of a :func:`runs_inline` function."""
    return getattr(awaitable, "cr_code", None) in _INLINE_CODE


def call_catching(
    fn: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Any, BaseException | None]:
    """Call ``fn`` in a worker thread: ``(result, None)`` or ``(None, error)``.

    A ``BaseException`` (``SystemExit`` & co.) becomes a ``RuntimeError``: it must never reach
    an event loop, which would stop the process.
    """
    try:
        return fn(*args), None
    except Exception as exc:
        return None, exc
    except BaseException as exc:
        return None, RuntimeError(f"{type(exc).__name__} in a worker thread: {exc}")


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Complete ``future`` unless its waiter gave up meanwhile (timed out, cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Lanes:
    """The thread pool and the rules for which thread runs what."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self._pool: ThreadPoolExecutor | None = None
        #: Set in an executor: runs sync user code (its main thread when free).
        self.main_lane: Callable[..., Awaitable[Any]] | None = None
        #: Set by an executor's fast lane: the thread that drives requests without a loop, and
        #: how it waits for an awaitable run on the executor's loop.
        self.inline_thread: int | None = None
        self.inline_wait: Callable[[Awaitable[Any]], Any] | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.max_threads,
                thread_name_prefix="flashrt",
                initializer=capture.clear_thread_stamp,
            )
        return self._pool

    def go_inline(self, thread: int, wait: Callable[[Awaitable[Any]], Any]) -> None:
        """On ``thread`` run blocking work inline, and awaitables that need a loop by ``wait``."""
        self.inline_thread = thread
        self.inline_wait = wait

    def inline(self) -> bool:
        """On the fast lane's thread, where no event loop runs."""
        return self.inline_thread is not None and threading.get_ident() == self.inline_thread

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the thread pool, in a copy of the caller's context."""
        if self.inline():
            result, error = call_catching(lambda: fn(*args, **kwargs), ())
            if error is not None:
                raise error
            return result  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ctx = contextvars.copy_context()

        def work() -> None:
            # One thread-safe callback straight into the awaited future: cheaper than
            # run_in_executor's chaining of a concurrent.futures.Future.
            if kwargs:
                result, error = ctx.run(call_catching, lambda: fn(*args, **kwargs), ())
            else:
                result, error = ctx.run(call_catching, fn, args)
            loop.call_soon_threadsafe(settle, future, result, error)

        self.pool.submit(work)
        return await future

    async def run_user_sync(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Call sync user code: off the event loop; in an executor, on its main thread if free."""
        if self.inline():
            return fn(*args)  # the fast lane: this is the main thread, and it is ours
        if self.main_lane is not None:
            return await self.main_lane(fn, *args)  # type: ignore[no-any-return]
        return await self.run_blocking(fn, *args)

    async def on_loop(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` on an event loop: from the fast lane, the executor's, while the
        fast lane waits, so every request's async state lives on one loop."""
        if self.inline_wait is not None and self.inline():
            return self.inline_wait(awaitable)  # type: ignore[no-any-return]
        return await awaitable

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
