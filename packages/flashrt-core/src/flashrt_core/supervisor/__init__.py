"""The supervisor: hands requests to executor processes and survives whatever they do.

It lives on the worker's event loop and never sees the ``Runtime``: it gets the settings, what
an executor's ``Setup`` carries, an "installs changed the environment" callback and the echo's
streams. The pool of executors serves new requests (:mod:`.serving`); each executor's state is
its own (:class:`~.process.ExecutorProcess`), changed only through its methods. The
:mod:`.launcher` keeps a ready spare and makes every later executor, forked by the zygote.

A death is seen at once (channel EOF, the process's end), never polled. It costs only the
request that caused it: every other request on the dead executor runs again once, each alone on
an executor of its own, never beside the culprit nor on the serving one; one that dies twice
fails, saying so. What the dead executor's code started is ended with it (:mod:`.descendants`).
Past its time limit (:mod:`.inflight`) a request is answered at once, and an executor whose code
keeps running past the grace period is recycled so it stops using the CPU or GPU.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..background import Background
from ..errors import CALLER_GONE
from ..failures import stage_failure
from ..protocol import FunctionResponse, decode_response, encode_response
from ..request_peek import Peeked, peek_request
from ..settings import executor_count
from ..stream import Streamed
from . import descendants
from .handover import Handover, release
from .inflight import RETRIED_NOTE, InFlight, Request
from .launcher import Launcher
from .process import ExecutorProcess
from .serving import Serving
from .spawning import ExecutorSetup, ExecutorUnavailable, ForkedChild, describe_exit
from .view import Description, ExecutorView, describe

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TextIO

    from ..protocol import FunctionRequest
    from ..settings import Settings

__all__ = [
    "RETRIED_NOTE",
    "Description",
    "ExecutorSetup",
    "ExecutorUnavailable",
    "ExecutorView",
    "Supervisor",
    "describe_exit",
]

log = logging.getLogger("flashrt.supervisor")

#: SIGTERM to SIGKILL for what a dead executor's code left running.
_DESCENDANTS_GRACE_S = 0.5


class Supervisor:
    """The worker side of the executor processes, used through :class:`~flashrt_core.Runtime`."""

    def __init__(
        self,
        settings: Settings,
        *,
        setup: Callable[[], ExecutorSetup],
        on_installed: Callable[[], None],
        echo_streams: Callable[[int], TextIO],
    ) -> None:
        self.settings = settings
        self._on_installed = on_installed
        self.loop = asyncio.get_running_loop()
        self.launcher = Launcher(settings, setup, self._watch)
        #: The pool of executors new requests go to, kept at its size.
        self.serving = Serving(self.launcher, executor_count(settings.executors))
        #: Every executor alive: the serving one, the spare, those running a retry alone, and
        #: any still finishing after it was told to go.
        self.executors: set[ExecutorProcess] = set()
        self.inflight = InFlight(settings, echo_streams, self._give_up)
        self.handover = Handover(settings, self.inflight, self.loop, self._retiring)
        self._first: ExecutorProcess | None = None  # spawned, while no zygote starts
        self._closing = False
        self._retries = Background()  # kept referenced, failures logged

    def describe(self) -> Description:
        """Its executors, their roles and loads, and the pool's health, as of now."""
        return describe(self.executors, self.launcher, self.serving, len(self.inflight))

    @property
    def problem(self) -> str | None:
        """Why no executor is serving now (None while one is, or while starting the first)."""
        return self.serving.problem

    # --- lifecycle ---------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the zygote's interpreter, or without one the first executor's (returns at
        once: start-up hooks run meanwhile)."""
        if self.settings.zygote:
            self.launcher.start_zygote()
        else:
            self._first = ExecutorProcess.spawn()
            self._watch(self._first)

    def _watch(self, executor: ExecutorProcess) -> None:
        self.executors.add(executor)
        executor.watch(self.loop, self._on_readable, self._died)

    async def start(self) -> None:
        """Wait until the first executor is serving; raise if it cannot."""
        if not self._spawned:
            self.spawn()
        executor = self._first or await self.launcher.make()
        self._first = None
        await self.launcher.await_hello(executor)
        self.serving.serve(executor)

    @property
    def _spawned(self) -> bool:
        return self._first is not None or self.launcher.zygote_started

    async def stop(self) -> None:
        """Answer what is left, TERM every executor (KILL after the grace period), and end what
        their code started."""
        self._closing = True
        self.launcher.stop_tasks()
        self.serving.stop()
        self.inflight.close("the worker stopped before this request finished")
        executors = list(self.executors)
        live = [executor for executor in executors if not executor.dead]
        if live:
            await asyncio.gather(
                *(executor.stop(self.settings.executor_stop_grace_s) for executor in live)
            )
        for executor in executors:
            executor.forget(self.loop)
        self.executors.clear()
        self.launcher.stop_zygote()
        await descendants.end_soon(self.loop, executors, self.settings.executor_stop_grace_s)

    # --- requests ----------------------------------------------------------------------------

    async def execute(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str | Peeked
    ) -> FunctionResponse:
        """Run ``request`` in an executor. Never raises (cancellation aside)."""
        answer = await self.execute_json(request)
        try:
            return decode_response(answer)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return stage_failure("encode result", f"the executor's answer is invalid: {exc}")

    async def execute_json(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str | Peeked
    ) -> bytes:
        """Run ``request`` in an executor; the response's JSON as the executor made it (or as
        the supervisor makes a failure). Never raises (cancellation aside)."""
        if isinstance(request, Peeked):
            peeked = request
        else:
            try:
                peeked = peek_request(request, self.settings)
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                return encode_response(stage_failure("decode", f"invalid request: {exc}"))
        result = await self._submit(
            Request(peeked.body, peeked.form, peeked.timeout, False, peeked.instance)
        )
        if isinstance(result, FunctionResponse):  # made here: a death, a time limit
            return encode_response(result)
        assert isinstance(result, bytes)
        return result

    async def run_deployed(
        self,
        job: Mapping[str, Any],
        on_item: Callable[[bytes], None] | None = None,
        max_item_bytes: int | None = None,
    ) -> Any:
        """Run the deployed QB handler on one plain job, in an executor; a generator's items
        come back as ``StreamItem`` frames, each passed to ``on_item`` as it arrives."""
        try:
            body = msgspec.json.encode({"id": job.get("id"), "input": job.get("input")})
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return {"success": False, "error": f"the job cannot be encoded: {exc}"}
        request = Request(body, "json", self.settings.time_limit(), deployed=True)
        request.on_item = on_item
        request.max_item_bytes = max_item_bytes
        return await self._submit(request)

    async def _submit(self, request: Request) -> Any:
        rid = self.inflight.add(request)
        try:
            serving = self.serving
            executor = (
                serving.pick(request.instance)
                if serving.ready
                else await serving.wait(request.instance)
            )
            if executor is None:
                failure = stage_failure(
                    "call", f"no executor process could be started: {self.problem}"
                )
                self.inflight.answer(rid, failure)
            elif self.inflight.get(rid) is request:  # else answered meanwhile (stopping)
                self.handover.send(executor, rid, request)
            return await request.future
        except asyncio.CancelledError as exc:
            if self.inflight.get(rid) is request:
                self.handover.give_up(rid, request, stop=exc.args[:1] != (CALLER_GONE,))
            raise
        finally:
            self.inflight.done(request)

    def _give_up(self, rid: int, request: Request) -> None:
        self.handover.give_up(rid, request)

    def _answer(self, rid: int, response: Any) -> None:
        request = self.inflight.get(rid)
        if request is not None:
            release(rid, request)
        self.inflight.answer(rid, response)

    # --- frames from executors --------------------------------------------------------------

    def _on_readable(self, executor: ExecutorProcess) -> None:
        frames = executor.read()
        if frames is None:
            self._eof(executor)
            return
        for frame in frames:
            self._on_frame(executor, frame)

    def _on_frame(self, executor: ExecutorProcess, frame: ch.Frame) -> None:
        inflight = self.inflight
        if isinstance(frame, ch.Output):
            inflight.output(frame.id, frame.stream, frame.text)
        elif isinstance(frame, ch.StreamItem):
            inflight.stream_item(frame.id, frame.data)
        elif isinstance(frame, ch.Result):
            if frame.exiting and executor.exit_reason is None:
                self._retiring(executor, frame.exiting)
            self._on_result(executor, frame)
        elif isinstance(frame, ch.Phase):
            inflight.phase(frame.id, frame.name)
        elif isinstance(frame, ch.Settled):
            executor.settle(frame.id)
        elif isinstance(frame, ch.Imported):
            self.launcher.imported(frame.modules)
        elif isinstance(frame, ch.Hello):
            if frame.installed:
                self._on_installed()
            executor.greeted(frame)
        elif isinstance(frame, ch.Exiting) and executor.exit_reason is None:
            self._retiring(executor, frame.reason)

    def _retiring(self, executor: ExecutorProcess, reason: str) -> None:
        """It goes (on purpose, or we decided): hand it nothing more, and replace it now."""
        executor.retire(reason)
        if executor in self.serving.pool:
            log.warning("executor %d is being replaced: %s", executor.proc.pid, reason)
        self.serving.replace(executor)

    def _on_result(self, executor: ExecutorProcess, frame: ch.Result) -> None:
        if executor.settle(frame.id):  # a late answer to a request we gave up on
            return
        request = self.inflight.get(frame.id)
        if request is None:
            return
        streamed = None
        if frame.streamed is not None:  # a deployed handler that yielded: its items went ahead
            streamed = Streamed(frame.streamed, frame.stream_error)
        value = request.answer_from(frame.body, streamed)
        if frame.installed:
            self._on_installed()
        if frame.instance_id:
            executor.holds(frame.instance_id)
            self.serving.holds(executor, frame.instance_id)
        self._answer(frame.id, value)
        if executor.retry_of == frame.id:  # it ran one retried request, alone: its work is done
            self._retiring(executor, "its retried request was answered")
            executor.kill(executor.exit_reason or "done")

    # --- death, retries, replacement ---------------------------------------------------------

    def _eof(self, executor: ExecutorProcess) -> None:
        """EOF usually means it is exiting: let its end say how, unless it lingers."""
        self.serving.replace(executor)  # hand it nothing more
        executor.unwatch_sockets(self.loop)
        told = executor.pidfd is not None or isinstance(executor.proc, ForkedChild)
        if not told or executor.proc.poll() is not None:
            self._died(executor)
            return
        self.loop.call_later(1.0, self._linger, executor)

    def _linger(self, executor: ExecutorProcess) -> None:
        if not executor.dead:
            executor.kill(executor.exit_reason or "closed its channel")
            self._died(executor)

    def _died(self, executor: ExecutorProcess) -> None:
        if executor.dead:
            return
        for frame in executor.drain():
            self._on_frame(executor, frame)
        executor.bury(self.loop)
        self.executors.discard(executor)
        was_spare = self.launcher.spare is executor
        self.launcher.forget(executor)
        descendants.end_soon(self.loop, [executor], _DESCENDANTS_GRACE_S)
        if self._closing:
            return
        what = executor.exit_reason or describe_exit(executor.proc.returncode)
        if executor.retry_of is None and not executor.failed_to_start:
            # A death nobody asked for is an error; one it announced or we caused is not.
            level = logging.ERROR if executor.exit_reason is None else logging.INFO
            log.log(level, "executor %d %s", executor.proc.pid, what)
        self._rerun_or_fail(executor, what)
        if was_spare:
            self.launcher.spare_died()
        self.serving.replace(executor)

    def _rerun_or_fail(self, executor: ExecutorProcess, what: str) -> None:
        """Each request the dead executor had runs again once, alone, or fails saying why."""
        lost = executor.lose_instances()
        for rid, request in self.inflight.lost_with(executor):
            release(rid, request)
            request.executor = None
            if self.inflight.retry(request):
                self._retries.spawn(self._retry_alone(rid, request))
            else:
                self.inflight.answer(rid, request.failure(request.death_message(what, lost)))

    async def _retry_alone(self, rid: int, request: Request) -> None:
        """Run a request that was on a dead executor again, on a fresh executor of its own: a
        culprit's retry can then only take itself down."""
        try:
            executor = await self.launcher.launch()
        except (ExecutorUnavailable, OSError) as exc:
            self.inflight.answer(
                rid, request.failure(f"its executor died, and no executor to retry it on: {exc}")
            )
            return
        executor.run_alone(rid)
        if self.inflight.get(rid) is not request or self._closing:  # answered meanwhile
            self._retiring(executor, "its retried request was answered")
            executor.kill("not needed")
            return
        self.handover.send(executor, rid, request)
