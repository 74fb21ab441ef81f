"""Where code runs: the thread pool, blocking work, and sync user code, never the event loop.

It knows nothing of requests. One :class:`Lanes` per process: the in-process runtime's, or the
executor's, whose main thread takes sync user code when it is free (``main_lane``).
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import capture

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["Lanes", "call_catching", "resolve"]

T = TypeVar("T")


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


def resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
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

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.max_threads,
                thread_name_prefix="flashrt",
                initializer=capture.clear_thread_stamp,
            )
        return self._pool

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the thread pool, in a copy of the caller's context."""
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
            loop.call_soon_threadsafe(resolve, future, result, error)

        self.pool.submit(work)
        return await future

    async def run_user_sync(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Call sync user code: off the event loop; in an executor, on its main thread if free."""
        if self.main_lane is not None:
            return await self.main_lane(fn, *args)  # type: ignore[no-any-return]
        return await self.run_blocking(fn, *args)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
