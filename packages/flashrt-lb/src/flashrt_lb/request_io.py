"""One HTTP request's input and its client, read from the ASGI messages themselves: the body,
bounded while it arrives, and the client's going away while its request runs.

Starlette's stream and header objects cost more than the rest of a small request's reading, so
the route reads raw ASGI; a body over the limit is refused as soon as it passes it, and never
buffered whole.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar

from flashrt_core.errors import CALLER_GONE
from flashrt_core.logs import request_id
from starlette.requests import ClientDisconnect

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from starlette.types import Receive, Scope

__all__ = ["WATCH_AFTER_S", "BodyTooLarge", "cancelled_if_gone", "header", "read_body"]

log = logging.getLogger("flashrt.lb")

T = TypeVar("T")

#: Seconds a request runs before its client's disconnect is watched for (the first such
#: disconnect is then seen at once).
WATCH_AFTER_S = 0.05
#: A declared body this large is read straight into one buffer of its size.
_PREALLOCATE_MIN = 1 << 20


class BodyTooLarge(Exception):
    """The body passed the limit while it arrived."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's raw value (``name`` lower-case), without building Starlette's
    header object."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The body, refused (:class:`BodyTooLarge`) as soon as it passes ``limit``;
    :class:`ClientDisconnect` when the client goes away while sending it."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    if declared is not None and declared.isdigit() and int(declared) >= _PREALLOCATE_MIN:
        return await _read_into(bytearray(int(declared)), receive)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_into(buf: bytearray, receive: Receive) -> bytes:
    """A large body of a declared length, read straight into its one buffer (joining the
    chunks would hold it twice); the server refuses a body longer than it declared."""
    view = memoryview(buf)
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        end = size + len(chunk)
        if end > len(buf):  # never from a conforming server: refuse rather than grow
            raise BodyTooLarge
        view[size:end] = chunk
        size = end
        if not message.get("more_body", False):
            # Shorter than declared only if the client went away mid-body.
            body = buf if size == len(buf) else buf[:size]
            return body  # type: ignore[return-value]  # a buffer: every reader takes one


async def cancelled_if_gone(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``; if the client disconnects meanwhile, cancel it and raise
    :class:`ClientDisconnect` (nobody is left to answer).

    The watch is a task awaiting ``receive``, which after the body says only
    ``http.disconnect``; it cancels this task with :data:`CALLER_GONE`, so the runtime cancels
    the request's code and leaves a sync call, which cannot be stopped, to end. It starts only
    once the request has run :data:`WATCH_AFTER_S`: a timer costs most requests a microsecond,
    a task ten.
    """
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    assert this is not None
    watch: list[asyncio.Task[bool]] = []
    timer = loop.call_later(
        WATCH_AFTER_S,
        lambda: watch.append(loop.create_task(_cancel_on_disconnect(receive, this))),
    )
    try:
        return await work
    except asyncio.CancelledError:
        if not (watch and watch[0].done() and not watch[0].cancelled() and watch[0].result()):
            raise  # not ours: the worker is stopping
        uncancel = getattr(this, "uncancel", None)  # 3.11+: the task is not cancelled now
        if uncancel is not None:
            uncancel()
        log.info(
            "request %s: the client disconnected; its call was cancelled (sync code, which "
            "cannot be interrupted, runs to its end and its result is dropped)",
            request_id.get(),
        )
        raise ClientDisconnect from None
    finally:
        timer.cancel()
        if watch:
            watch[0].cancel()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> bool:
    """Cancel ``task`` (with :data:`CALLER_GONE`) once the client has disconnected; whether
    it did."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot say: the request runs unwatched
        log.debug("cannot watch for the client's disconnect", exc_info=True)
        return False
    task.cancel(CALLER_GONE)
    return True
