"""Calling the loaded ``flash build``-generated QB handler: one plain-JSON job, its answer.

Per queue resource ``flash build`` (runpod-flash 1.21) generates a ``handler_<resource>.py``
whose ``handler(job)`` takes plain JSON kwargs in ``job["input"]`` and returns the plain result,
or ``{"success": False, "error", "traceback"}``. That handler is synchronous (it runs coroutines
with ``asyncio.run`` itself), so it is called off the event loop. For a resource with
``max_concurrency`` > 1 that the manifest marks ``is_async`` (1.21 marks every function so, and
a class with one async method), the handler is ``async def`` and awaits the function or method:
it is awaited on the loop, so its jobs overlap; when what it would await is a plain ``def``, the
user's code is called directly instead (:mod:`flashrt_core.direct_calls`). For a generator
function the handler returns the generator itself: its items are streamed to the caller as they
are yielded (:mod:`flashrt_core.stream`). This runs where user code runs: the executor process
by default; loading the handler is :mod:`flashrt_core.handler_loading`'s.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Mapping

    from .direct_calls import DirectCalls
    from .lanes import Lanes

__all__ = ["DeployedHandler", "is_function_request", "run_deployed_job"]

log = logging.getLogger("flashrt.deployed")


def is_function_request(job_input: Any) -> bool:
    """Whether a deployed worker's job input is a FunctionRequest rather than plain kwargs.

    Live clients always send ``execution_type`` and the code; code-less requests for the
    manifest's ``function_registry`` send ``execution_type`` with ``function_name`` or
    ``class_name``. Plain kwargs of a user function would have to use those names together.
    """
    if not isinstance(job_input, dict):
        return False
    if "function_code" in job_input or "class_code" in job_input:
        return True
    return "execution_type" in job_input and (
        "function_name" in job_input or "class_name" in job_input
    )


class DeployedHandler:
    """The loaded ``handler`` of ``handler_<resource>.py``.

    The generated handler of a generator function returns the generator (sync or async)
    unstarted: its items are then pulled one at a time (a sync one's in the user's sync lane,
    an async one's on the loop) and each goes to ``on_item`` as soon as it is yielded; without
    ``on_item`` they are gathered and the list is the output (what ``--test_input`` shows).

    ``direct``: the user's code called as what it is, instead of a concurrent (``async``)
    handler that would ``await`` a plain ``def`` (see
    :class:`~flashrt_core.direct_calls.DirectCalls`).
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Any]], Any],
        resource: str,
        direct: DirectCalls | None = None,
    ) -> None:
        self.fn = fn
        self.resource = resource
        self.is_async = inspect.iscoroutinefunction(fn)
        self.direct = direct
        self.yields = inspect.isasyncgenfunction(fn)

    async def __call__(
        self,
        lanes: Lanes,
        job: Mapping[str, Any],
        on_item: Callable[[bytes], None] | None = None,
        max_item_bytes: int | None = None,
    ) -> Any:
        """Run one job; a raised exception becomes the job's error (the SDK's shape). A
        generator's items go to ``on_item`` (JSON, each at most ``max_item_bytes``), and the
        answer is then :class:`~flashrt_core.stream.Streamed`."""
        payload = {"id": job.get("id"), "input": job.get("input")}
        try:
            if self.direct is not None:
                result = await self.direct(lanes, payload["input"])
            elif self.yields:
                result = self.fn(payload)
            elif self.is_async:
                result = await self.fn(payload)
            else:
                result = await lanes.run_user_sync(self.fn, payload)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            return {"error": self._raised(exc)}
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            return await self._stream(lanes, result, on_item, max_item_bytes)
        return result

    def _raised(self, exc: BaseException) -> str:
        return (
            f"deployed handler of {self.resource!r} raised {type(exc).__name__}: {exc}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )

    async def _stream(
        self,
        lanes: Lanes,
        items: Generator[Any, Any, Any] | AsyncGenerator[Any, Any],
        on_item: Callable[[bytes], None] | None,
        limit: int | None,
    ) -> Any:
        """Pull the generator's items, each to ``on_item`` as it comes (the runpod SDK's rules:
        an exception, or an item that is a dict with an ``error``, ends the stream with that
        error); an unfinished generator is closed, so its ``finally`` runs."""
        from .stream import Streamed, encode_item, item_too_large

        gathered: list[Any] = []
        sent = 0
        error: str | None = None
        finished = False
        while True:
            try:
                if isinstance(items, AsyncGenerator):
                    item = await anext(items, _END)
                else:
                    item = await lanes.run_user_sync(next, items, _END)
            except Exception as exc:  # a generator that raised is finished
                error, finished = self._raised(exc), True
                break
            if item is _END:
                finished = True
                break
            if isinstance(item, dict) and item.get("error"):
                error = str(item["error"])
                break
            if on_item is None:
                gathered.append(item)
                continue
            try:
                data = encode_item(item)
            except (TypeError, ValueError) as exc:
                error = f"stream item {sent + 1} cannot be sent as JSON: {exc}"
                break
            if limit is not None and len(data) > limit:
                error = item_too_large(sent + 1, len(data), limit)
                break
            on_item(data)
            sent += 1
        if not finished:
            await _close(lanes, items)
        if error is not None:
            log.warning("the stream of %r ended early: %s", self.resource, error.splitlines()[0])
        if on_item is None:
            return {"error": error} if error is not None else gathered
        return Streamed(sent, error)


#: What ``next`` answers for an exhausted generator (StopIteration cannot cross a future).
_END = object()


async def _close(lanes: Lanes, items: Generator[Any, Any, Any] | AsyncGenerator[Any, Any]) -> None:
    """Close a generator left unfinished (its ``finally`` is user code: a sync one's runs in
    the sync lane); what closing raises is not the job's error, which is already decided."""
    try:
        if isinstance(items, AsyncGenerator):
            await items.aclose()
        else:
            await lanes.run_user_sync(items.close)
    except Exception as exc:
        log.warning("closing a deployed generator raised %s: %s", type(exc).__name__, exc)


async def run_deployed_job(
    handler: DeployedHandler | None,
    lanes: Lanes,
    job: Any,
    on_item: Callable[[bytes], None] | None = None,
    max_item_bytes: int | None = None,
) -> Any:
    """One plain-JSON job through the loaded handler (``None``: this process serves none); a
    generator's items go to ``on_item`` as they come (see :class:`DeployedHandler`)."""
    if handler is None:
        return {
            "success": False,
            "error": "this worker serves no deployed handler (FLASH_RESOURCE_NAME?)",
        }
    return await handler(lanes, job, on_item, max_item_bytes)
