"""The requests handed to executors and not yet answered: each one's timer, output and retries.

One :class:`Request` per call of the supervisor, from hand-over until its caller has an answer;
the :class:`InFlight` table owns their timers (the time limit, paused while dependencies
install), the bounded copy of their output (used only if the executor dies before answering)
and their live echo. A request given up on leaves the table: its executor keeps track of it
(:meth:`~.process.ExecutorProcess.abandon`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from ..failures import stage_failure
from ..logs import request_id

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TextIO

    from ..echo import LineEcho
    from ..settings import Settings
    from ..stream import Streamed
    from .process import ExecutorProcess

__all__ = ["RETRIED_NOTE", "InFlight", "Request"]

log = logging.getLogger("flashrt.supervisor")

RETRIED_NOTE = "[flashrt] the executor process died while this request ran; running it again\n"


class Request:
    """One request handed to the executor, until it is answered."""

    __slots__ = (
        "attempts",
        "body",
        "deadline",
        "deployed",
        "echo",
        "executor",
        "form",
        "future",
        "instance",
        "max_item_bytes",
        "on_item",
        "output",
        "output_size",
        "request_id",
        "streamed",
        "timeout",
    )

    def __init__(
        self,
        body: bytes,
        form: str,
        timeout: float | None,
        deployed: bool,
        instance: str | None = None,
    ) -> None:
        self.body = body
        self.instance = instance  # the class instance it calls: run where that lives
        self.form = form
        self.timeout = timeout  # seconds; None: no limit of ours
        self.deployed = deployed
        #: Its answer; made by :meth:`InFlight.add` (the table knows the loop: asking asyncio
        #: for it costs a system call).
        self.future: asyncio.Future[Any]
        self.attempts = 0
        self.output: list[str] = []
        self.output_size = 0
        #: When its time limit ends (the loop's clock); ``None`` while it is not running.
        self.deadline: float | None = None
        self.echo: LineEcho | None = None
        self.request_id = request_id.get()
        #: The executor it was handed to, while it is there.
        self.executor: ExecutorProcess | None = None
        #: A deployed job's stream: where each item goes as it comes, the largest item the
        #: caller takes, and how many went (a request that streamed anything is never retried:
        #: its items would go twice).
        self.on_item: Callable[[bytes], None] | None = None
        self.max_item_bytes: int | None = None
        self.streamed = 0

    def death_message(self, what: str, lost: list[str]) -> str:
        """Why it failed: its executor died (``what`` says how), and which instances went."""
        message = f"the executor process running this request {what}"
        if self.attempts > 1:
            message += " (the request ran twice, and the executor died both times)"
        if lost:
            named = ", ".join(lost[:20]) + (f" and {len(lost) - 20} more" if len(lost) > 20 else "")
            message += (
                f"; class instances it held were lost ({named}): the next call "
                "with one of those instance_ids builds it again"
            )
        return message

    def answer_from(self, body: bytes, streamed: Streamed | None = None) -> Any:
        """Its caller's answer from the executor's ``Result``: a response's JSON as it is
        (never decoded here), a deployed handler's output decoded (an invalid one said so), or
        the end of the stream it yielded (``streamed``)."""
        if self.deployed:
            if streamed is not None:
                return streamed
            try:
                return msgspec.msgpack.decode(body)
            except msgspec.DecodeError as exc:
                return {"success": False, "error": f"the deployed handler's output: {exc}"}
        return body

    def failure(self, message: str) -> Any:
        """The caller's answer for a request that did not finish, with its output so far."""
        stdout = "".join(self.output) or None
        if self.deployed:
            return {"success": False, "error": message, "stdout": stdout}
        return stage_failure("call", message, stdout)


class InFlight:
    """The table of requests in flight, by the id their frames carry."""

    def __init__(
        self,
        settings: Settings,
        echo_streams: Callable[[int], TextIO],
        on_expired: Callable[[int, Request], None],
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self._echo_streams = echo_streams
        self._on_expired = on_expired  # after a timed-out request is answered: stop its code
        self._ids = itertools.count(1)
        self._requests: dict[int, Request] = {}
        self._timer: asyncio.TimerHandle | None = None  # at the soonest deadline

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: Request) -> int:
        request.future = self.loop.create_future()
        rid = next(self._ids)
        self._requests[rid] = request
        return rid

    def get(self, rid: int) -> Request | None:
        return self._requests.get(rid)

    # --- time limits --------------------------------------------------------------------------
    #
    # One loop timer for the whole table, at the soonest deadline: a request's limit is then a
    # float, not a timer made and cancelled per request. Limits are mostly alike, so a new one
    # rarely moves the timer; when it fires it looks at every request once.

    def arm(self, rid: int, request: Request) -> None:
        """Start (or restart) the request's time limit, if it has one."""
        if request.timeout is None:
            return
        deadline = request.deadline = self.loop.time() + request.timeout
        if self._timer is None or deadline < self._timer.when():
            self._schedule(deadline)

    def phase(self, rid: int, name: str) -> None:
        """The request's code reached ``name``: its time limit runs from the call only
        (installs, loading are not the call)."""
        request = self._requests.get(rid)
        if request is not None:
            request.deadline = None
            if name == "call":
                self.arm(rid, request)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        now = self.loop.time()
        soonest: float | None = None
        for rid, request in list(self._requests.items()):
            deadline = request.deadline
            if deadline is None:
                continue
            if deadline <= now:
                self._expired(rid, request)
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if soonest is not None:
            self._schedule(soonest)

    def _expired(self, rid: int, request: Request) -> None:
        request.deadline = None
        message = f"timed out after {request.timeout:g} s"
        log.warning("request %s %s", request.request_id or rid, message)
        if request.deployed:
            self.answer(rid, {"success": False, "error": f"the deployed handler {message}"})
        else:
            self.answer(rid, request.failure(message))
        self._on_expired(rid, request)

    # --- output -------------------------------------------------------------------------------

    def output(self, rid: int, stream: int, text: str) -> None:
        """A line the request's code wrote: echoed live, and copied (bounded) for a death."""
        request = self._requests.get(rid)
        if request is None:
            return
        if self.settings.echo:
            if request.echo is None:  # made at the first output: most requests print nothing
                from ..echo import LineEcho

                request.echo = LineEcho(
                    self.settings.echo_max_bytes, request.request_id, streams=self._echo_streams
                )
            request.echo(stream, text)
        room = self.settings.max_output_bytes - request.output_size
        if room > 0:
            text = text[:room]
            request.output.append(text)
            request.output_size += len(text)

    def stream_item(self, rid: int, data: bytes) -> None:
        """An item the request's generator yielded: to its caller now, in order."""
        request = self._requests.get(rid)
        if request is None or request.on_item is None:
            return  # given up on, or answered: its caller takes no more items
        request.streamed += 1
        try:
            request.on_item(data)
        except Exception:  # the caller's callback: never the supervisor's frame loop
            log.exception("a stream item's callback failed (request %s)", request.request_id)

    # --- endings ------------------------------------------------------------------------------

    def answer(self, rid: int, value: Any) -> None:
        request = self._requests.pop(rid, None)
        if request is not None and not request.future.done():
            request.future.set_result(value)

    def done(self, request: Request) -> None:
        """Its caller has its answer (or stopped waiting): release what it held."""
        request.deadline = None
        if request.echo is not None:
            request.echo.close()

    def remove(self, rid: int) -> None:
        """Its caller stopped waiting: it leaves the table unanswered."""
        self._requests.pop(rid, None)

    def close(self, why: str) -> None:
        """The worker stops: what is in flight fails saying ``why``, and no timer of ours fires
        any more."""
        for rid, request in list(self._requests.items()):
            self.answer(rid, request.failure(why))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def lost_with(self, executor: ExecutorProcess) -> list[tuple[int, Request]]:
        """The requests a dead ``executor`` had."""
        return [(rid, r) for rid, r in self._requests.items() if r.executor is executor]

    def retry(self, request: Request) -> bool:
        """Whether a request whose executor died runs again (once); notes it in its output."""
        request.deadline = None
        if not self.settings.retry_on_executor_death or request.attempts >= 2 or request.streamed:
            return False
        request.output.append(RETRIED_NOTE)
        request.output_size = sum(len(t) for t in request.output)
        return True
