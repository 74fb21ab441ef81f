"""What the executor tracks about one request while it runs, and how its answer leaves."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from .. import protocol
from ..capture import encodable
from ..protocol import FunctionRequest
from .integrity import cuda_context_lost

if TYPE_CHECKING:
    import asyncio

    from ..protocol import FunctionResponse
    from ..stream import Streamed
    from ..timing import Timings
    from .carry import ImportReport
    from .integrity import Integrity

__all__ = [
    "Answerer",
    "RequestState",
    "Streamer",
    "current_state",
    "encode_response",
    "exit_now",
    "request_body",
]

_STREAM_HOLD = 4096
_request = msgspec.msgpack.Decoder(FunctionRequest)
_loose_request = msgspec.msgpack.Decoder(FunctionRequest, strict=False)  # as decode_request


class RequestState:
    """One request while it runs: cancelled? installed? sync code still running?"""

    __slots__ = (
        "cancelled",
        "id",
        "install_announced",
        "install_phase",
        "installed",
        "sync_running",
    )

    def __init__(self, rid: int) -> None:
        self.id = rid
        self.cancelled = False
        self.installed = False
        self.sync_running = 0
        #: The pending announcement of its install phase (see ``ExecutorServer._on_phase``).
        self.install_phase: asyncio.TimerHandle | None = None
        self.install_announced = False


current_state: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar(
    "flashrt_request_state", default=None
)


class Streamer:
    """Sends a request's output to the supervisor a line at a time, as it is written.

    On the channel the request's answer takes, so the supervisor sees every line before it.
    """

    __slots__ = ("_chan", "_held", "_id")

    def __init__(self, chan: ch.Channel, rid: int) -> None:
        self._chan = chan
        self._id = rid
        self._held: dict[int, str] = {}

    def __call__(self, stream: int, text: str) -> None:
        held = self._held.pop(stream, "") + text
        if "\n" in text or len(held) > _STREAM_HOLD:
            self._send(stream, held)
        elif held:
            self._held[stream] = held

    def flush(self) -> None:
        held, self._held = self._held, {}
        for stream, text in held.items():
            self._send(stream, text)

    def _send(self, stream: int, text: str) -> None:
        with contextlib.suppress(OSError):
            self._chan.send(ch.Output(self._id, stream, encodable(text, note=False)))


def request_body(frame: ch.Execute) -> Any:
    """What ``Runtime.execute_here`` takes: JSON bytes, a mapping, or a ``FunctionRequest``."""
    if frame.form == "json":
        return frame.body
    if frame.form == "request":
        return _request.decode(frame.body)
    try:  # a mapping: most are a bare request, decoded straight to one
        return _loose_request.decode(frame.body)
    except msgspec.ValidationError:  # an envelope, or invalid: the pipeline says which
        return msgspec.msgpack.decode(frame.body)


def encode_response(response: FunctionResponse) -> bytes:
    """The JSON the client reads for ``response``, whatever characters the user's code
    produced: made once, here; the worker hands these bytes to its transport."""
    return protocol.encode_response(response)


def exit_now(status: int) -> None:
    """Leave at once (no atexit, no thread joins): user threads must not keep us alive."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]
    os._exit(status)


class Answerer:
    """Sends each answer, checked first, and ends the process when the check fails.

    The interpreter (critical modules, builtins) and the CUDA verdict are checked before the
    answer goes, so a poisoned executor says it exits in that answer and the supervisor hands it
    nothing more. The rest comes after, when the caller has its answer: the timing line, the
    descriptors, every other module, and the user's new imports (``Imported``, when ``imports``
    is given). A broken one ends the process: the supervisor starts a fresh executor.
    """

    def __init__(
        self,
        chan: ch.Channel,
        integrity: Integrity,
        timing_log: bool,
        imports: ImportReport | None = None,
    ) -> None:
        self.chan = chan
        self.integrity = integrity
        self.timing_log = timing_log
        self.imports = imports

    def send(
        self,
        rid: int,
        response: FunctionResponse,
        *,
        installed: bool = False,
        timings: Timings | None = None,
        note: str | None = None,
    ) -> None:
        """``note`` goes before the response's ``stdout`` (see :class:`~..channel.Execute`)."""
        if note:
            response.stdout = note + (response.stdout or "")
        reason = cuda_context_lost(response) or self.integrity.interpreter_problem()
        body = encode_response(response)
        self._send(ch.Result(rid, body, installed, response.instance_id, reason))
        if timings is not None:
            timings.log(response)
        self._after(reason)

    def send_deployed(self, rid: int, body: bytes, streamed: Streamed | None = None) -> None:
        """``body``: msgpack of the handler's output; empty when it yielded (``streamed``)."""
        reason = self.integrity.interpreter_problem()
        if streamed is None:
            self._send(ch.Result(rid, body, exiting=reason))
        else:
            items, error = streamed.items, streamed.error
            self._send(ch.Result(rid, body, exiting=reason, streamed=items, stream_error=error))
        self._after(reason)

    def _send(self, frame: ch.Result | ch.Imported | ch.Exiting) -> None:
        with contextlib.suppress(OSError):  # the request closed the channel: we exit below
            self.chan.send(frame)

    def _after(self, reason: str | None) -> None:
        joined: list[str] = []
        if reason is None:
            reason = self.integrity.descriptor_problem()
            if reason is None:
                reason, joined = self.integrity.module_changes()
            if reason is not None:
                # A request sent meanwhile runs again on the fresh executor.
                self._send(ch.Exiting(reason))
        if reason is not None:
            exit_now(0)
        if joined and self.imports is not None and (found := self.imports.new(joined)):
            self._send(ch.Imported(found))
