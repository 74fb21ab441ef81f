"""Where the sync user code of the loop's requests runs: the main thread when it is free
(``signal.signal`` works there), else the thread pool; never the event loop.

A call on the main thread outlives a request that broke the event loop (closed its
descriptors): it then answers from there, and the executor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import TYPE_CHECKING, Any

from .. import channel as ch
from ..lanes import call_catching, resolve
from ..pipeline import current_request
from .answering import current_state, encode_response, exit_now

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..lanes import Lanes
    from ..protocol import FunctionRequest
    from .main_thread import MainThread

__all__ = ["SyncCalls"]


class SyncCalls:
    """The executor's :attr:`Lanes.main_lane <flashrt_core.lanes.Lanes.main_lane>`.

    ``loop_intact`` says whether the event loop's descriptors are still open.
    """

    def __init__(
        self, chan: ch.Channel, lane: MainThread, lanes: Lanes, loop_intact: Callable[[], bool]
    ) -> None:
        self.chan = chan
        self.lane = lane
        self.lanes = lanes
        self.loop_intact = loop_intact

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        ctx = contextvars.copy_context()
        state = current_state.get()
        if state is not None:
            state.sync_running += 1
        on_main: list[bool] = [False]

        def work() -> None:
            result, error = ctx.run(call_catching, fn, args)
            if on_main[0]:
                self.lane.free()
            if state is not None:
                state.sync_running -= 1
            request = ctx.get(current_request)
            if on_main[0] and request is not None and not self.loop_intact():
                self._rescue(ctx, request, result, error)
            loop.call_soon_threadsafe(resolve, future, result, error)
            if state is not None and state.cancelled and state.sync_running == 0:
                with contextlib.suppress(OSError):
                    self.chan.send(ch.Settled(state.id))

        on_main[0] = True
        if not self.lane.try_run(work):
            on_main[0] = False
            self.lanes.pool.submit(work)
        return await future

    def _rescue(
        self,
        ctx: contextvars.Context,
        request: FunctionRequest,
        result: Any,
        error: BaseException | None,
    ) -> None:
        """The request closed the event loop's descriptors: answer from here, then exit."""
        from .. import capture
        from ..codecs import encode_result
        from ..failures import failure_response
        from ..protocol import FunctionResponse

        state = ctx.get(current_state)
        if error is not None:
            response = failure_response("call", error, error.__traceback__)
        else:
            try:
                encoded, json_result = encode_result(result, request.serialization_format)
                response = FunctionResponse(success=True, result=encoded, json_result=json_result)
            except Exception as exc:
                response = failure_response("encode result", exc, exc.__traceback__)
        if request.execution_type == "class":
            response.instance_id = request.instance_id
        buffer = ctx.run(capture.current_buffer)
        response.stdout = buffer.getvalue() if buffer is not None else None
        reason = "a request closed file descriptors the executor's event loop needs"
        if state is not None:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Result(state.id, encode_response(response), exiting=reason))
        with contextlib.suppress(OSError):
            self.chan.send(ch.Exiting(reason))
        exit_now(0)
