"""The supervisor: spawns the executor process, hands it requests, survives whatever it does.

It lives on the worker's event loop (the shells' ``Runtime``). The executor is a fresh
interpreter (:mod:`.process`) whose stdin is our end of a socketpair
(:mod:`flashrt_core.channel`); a simple request alone in flight goes over a second one, the fast
lane, whose answer the loop awaits without sleeping for a short while.

Its death is seen at once, through EOF on the channel or its pidfd becoming readable, never a
poll. Every request in flight then either runs again on a fresh executor (once) or is answered
with what happened and the output it produced so far. Time limits are applied here
(:mod:`.inflight` holds each request's timer): a request past its limit is answered at once, and
an executor whose code keeps running past the grace period is recycled so the runaway code stops
using the CPU or GPU.

It never sees the ``Runtime``: it gets the settings, what the executor's ``Setup`` carries, a
callback for "an install changed the environment", and the streams the live echo writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..failures import stage_failure
from ..protocol import FunctionResponse
from ..request_peek import Peeked, peek_request
from .backoff import Backoff
from .inflight import RETRIED_NOTE, InFlight, Request
from .process import ExecutorProcess, ExecutorSetup, ExecutorUnavailable, describe_exit

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TextIO

    from ..protocol import FunctionRequest
    from ..settings import Settings

__all__ = ["RETRIED_NOTE", "ExecutorSetup", "ExecutorUnavailable", "Supervisor", "describe_exit"]

log = logging.getLogger("flashrt.supervisor")

_response = msgspec.msgpack.Decoder(FunctionResponse)


class Supervisor:
    """The worker side of the executor process, used through :class:`~flashrt_core.Runtime`."""

    def __init__(
        self,
        settings: Settings,
        *,
        setup: Callable[[], ExecutorSetup],
        on_installed: Callable[[], None],
        echo_streams: Callable[[int], TextIO],
    ) -> None:
        self.settings = settings
        self._setup_contents = setup  # asked at each spawn: start-up may unpack the app meanwhile
        self._on_installed = on_installed
        self.loop = asyncio.get_running_loop()
        self.executor: ExecutorProcess | None = None
        #: Why no executor is serving now (None while one is, or while starting the first).
        self.problem: str | None = None
        self._ready = asyncio.Event()
        self.inflight = InFlight(settings, echo_streams, self._give_up)
        self._backoff = Backoff()
        self._instances: set[str] = set()
        self._closing = False
        self._restarting: asyncio.Task[None] | None = None
        self._fast_id: int | None = None  # the request in the fast lane, if one is
        self._spin_s = max(0, settings.spin_us) / 1e6
        #: Requests handed to the executor, by lane: "fast" (its main thread) or "loop".
        self.lanes = {"fast": 0, "loop": 0}
        self.restarts = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start a fresh executor interpreter (returns at once; :meth:`start` waits for it)."""
        executor = ExecutorProcess.spawn()
        self.executor = executor
        executor.watch(self.loop, self._on_readable, self._died)

    async def start(self) -> None:
        """Wait until the executor spawned by :meth:`spawn` is serving; raise if it cannot."""
        if self.executor is None:
            self.spawn()
        assert self.executor is not None
        await self._await_hello(self.executor)

    async def _await_hello(self, executor: ExecutorProcess) -> None:
        # Sent now, not at spawn: the start-up hooks may have unpacked the app meanwhile.
        executor.send_setup(self.settings, self._setup_contents())
        timeout = self.settings.executor_start_timeout_s
        try:
            hello = await asyncio.wait_for(asyncio.shield(executor.hello), timeout)
        except asyncio.TimeoutError:
            executor.kill("did not start in time")
            raise ExecutorUnavailable(
                f"the executor process did not start within {timeout:g} s"
            ) from None
        if hello.error:
            executor.kill("start-up failed")
            raise ExecutorUnavailable(f"the executor process could not start: {hello.error}")
        self.problem = None
        self._ready.set()
        log.info("executor %d ready", hello.pid)

    async def stop(self) -> None:
        """Answer what is left, then TERM the executor and KILL it after the grace period."""
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
        for rid, request in list(self.inflight.requests.items()):
            self.inflight.answer(
                rid, request.failure("the worker stopped before this request finished")
            )
        self.inflight.forget_abandoned()
        executor = self.executor
        if executor is None or executor.dead:
            return
        await executor.stop(self.settings.executor_stop_grace_s)
        executor.forget(self.loop)

    # --- requests ----------------------------------------------------------------------------

    async def execute(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | str | Peeked
    ) -> FunctionResponse:
        """Run ``request`` in the executor. Never raises (cancellation aside)."""
        if isinstance(request, Peeked):
            peeked = request
        else:
            try:
                peeked = peek_request(request, self.settings)
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                return stage_failure("decode", f"invalid request: {exc}")
        result = await self._submit(
            Request(peeked.body, peeked.form, peeked.timeout, False, peeked.simple)
        )
        assert isinstance(result, FunctionResponse)
        return result

    async def run_deployed(self, job: Mapping[str, Any]) -> Any:
        """Run the deployed QB handler on one plain job, in the executor."""
        try:
            body = msgspec.json.encode({"id": job.get("id"), "input": job.get("input")})
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return {"success": False, "error": f"the job cannot be encoded: {exc}"}
        return await self._submit(Request(body, "json", self.settings.timeout_s, deployed=True))

    async def _submit(self, request: Request) -> Any:
        rid = self.inflight.add(request)
        try:
            if await self._dispatch(rid, request) and self._spin_s:
                # The event loop keeps running (other requests are served) but never sleeps
                # while a quick answer is due: waking it would cost more than the call.
                clock = time.perf_counter
                until = clock() + self._spin_s
                while not request.future.done() and clock() < until:  # noqa: ASYNC110
                    await asyncio.sleep(0)
            return await request.future
        except asyncio.CancelledError:
            if self.inflight.get(rid) is request:
                self._give_up(rid)
            raise
        finally:
            self.inflight.done(request)

    async def _dispatch(self, rid: int, request: Request) -> bool:
        """Hand the request to a serving executor (waiting, bounded, for one to be ready).

        ``True`` when it went to the fast lane.
        """
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.settings.executor_start_timeout_s)
            except asyncio.TimeoutError:
                self.inflight.answer(
                    rid,
                    stage_failure("call", f"no executor process could be started: {self.problem}"),
                )
                return False
        if self.inflight.get(rid) is not request:  # answered meanwhile (the worker is stopping)
            return False
        executor = self.executor
        assert executor is not None
        request.attempts += 1
        chan = executor.chan
        if request.deployed:
            frame: ch.Frame = ch.RunDeployed(rid, request.body, request.request_id)
        else:
            frame = ch.Execute(rid, request.body, request.form, request.request_id)
            if (
                request.simple
                and executor.fast_ok
                and self._fast_id is None
                and len(self.inflight) == 1
                and not self.inflight.abandoned
            ):
                # Alone in flight, so the executor's main thread is free: it runs this itself.
                chan = executor.fast
                self._fast_id = rid
        self.lanes["fast" if chan is executor.fast else "loop"] += 1
        try:
            chan.send(frame)
        except OSError:
            return False  # it is dying: its death handling retries or answers this request
        self.inflight.arm(rid, request)
        return chan is executor.fast

    def _answer(self, rid: int, response: Any) -> None:
        if rid == self._fast_id:
            self._fast_id = None
        self.inflight.answer(rid, response)

    def _give_up(self, rid: int) -> None:
        """The caller stopped waiting: tell the executor, and watch that it really stops."""
        if rid == self._fast_id:
            self._fast_id = None  # the abandoned entry keeps the lane closed until it ends
        executor = self.executor
        if executor is None or executor.dead:
            self.inflight.requests.pop(rid, None)
            return
        with contextlib.suppress(OSError):
            executor.chan.send(ch.Cancel(rid))
        self.inflight.abandon(
            rid, self.settings.hard_timeout_grace_s, lambda: self._runaway(executor)
        )

    def _runaway(self, executor: ExecutorProcess) -> None:
        if executor.dead or executor is not self.executor:
            return
        grace = self.settings.hard_timeout_grace_s
        reason = (
            f"a request's code kept running {grace:g} s past its time limit; the executor was "
            "recycled to stop it"
        )
        log.warning("%s", reason)
        executor.kill(reason)

    # --- frames from the executor -----------------------------------------------------------

    def _on_readable(self, executor: ExecutorProcess, chan: ch.Channel) -> None:
        frames = executor.read(chan)
        if frames is None:
            self._eof(executor)
            return
        for frame in frames:
            self._on_frame(executor, frame)

    def _on_frame(self, executor: ExecutorProcess, frame: ch.Frame) -> None:
        inflight = self.inflight
        if isinstance(frame, ch.Output):
            inflight.output(frame.id, frame.stream, frame.text)
        elif isinstance(frame, ch.Result):
            if frame.exiting and executor.exit_reason is None:
                self._retiring(executor, frame.exiting)
            self._on_result(frame)
        elif isinstance(frame, ch.Phase):
            request = inflight.get(frame.id)
            if request is not None:
                inflight.pause(request)
                if frame.name == "call":
                    inflight.arm(frame.id, request)
        elif isinstance(frame, ch.Settled):
            inflight.settled(frame.id)
        elif isinstance(frame, ch.Hello):
            if not executor.hello.done():
                executor.fast_ok = frame.fast
                executor.hello.set_result(frame)
        elif isinstance(frame, ch.Exiting) and executor.exit_reason is None:
            self._retiring(executor, frame.reason)

    def _retiring(self, executor: ExecutorProcess, reason: str) -> None:
        """It exits on purpose: hand it nothing more; its death brings the fresh one."""
        executor.exit_reason = reason
        if self.executor is executor:
            self._ready.clear()
        log.warning("executor %d is being replaced: %s", executor.proc.pid, reason)

    def _on_result(self, frame: ch.Result) -> None:
        if self.inflight.settled(frame.id):  # a late answer to a request we gave up on
            return
        request = self.inflight.get(frame.id)
        if request is None:
            return
        if request.deployed:
            try:
                value: Any = msgspec.msgpack.decode(frame.body)
            except msgspec.DecodeError as exc:
                value = {"success": False, "error": f"the deployed handler's output: {exc}"}
        else:
            try:
                value = _response.decode(frame.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                value = stage_failure("encode result", f"the executor's answer is invalid: {exc}")
            if request.attempts > 1:  # say so: its side effects may have happened twice
                value.stdout = RETRIED_NOTE + (value.stdout or "")
        if frame.installed:
            self._on_installed()
        if frame.instance_id:
            self._instances.add(frame.instance_id)
        self._answer(frame.id, value)

    # --- death and restart ------------------------------------------------------------------

    def _eof(self, executor: ExecutorProcess) -> None:
        """EOF usually means it is exiting: let its pidfd say how, unless it lingers."""
        if executor is self.executor:
            self._ready.clear()  # hand it nothing more
        executor.unwatch_sockets(self.loop)
        if executor.pidfd is None or executor.proc.poll() is not None:
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
        if executor.proc.poll() is None:
            # EOF with the process alive (it closed its channel), or a pidfd event racing the
            # reaper: either way it is no use any more.
            executor.kill(executor.exit_reason or "closed its channel")
            with contextlib.suppress(subprocess.TimeoutExpired):
                executor.proc.wait(timeout=5)
        executor.forget(self.loop)
        if not executor.hello.done():
            executor.hello.set_exception(
                ExecutorUnavailable(
                    f"the executor process {describe_exit(executor.proc.returncode)} while starting"
                )
            )
            executor.hello.exception()  # retrieved: start() or the restart task reports it
        if self.executor is executor:
            self._ready.clear()
        if self._closing:
            return
        planned = executor.exit_reason is not None
        what = executor.exit_reason or describe_exit(executor.proc.returncode)
        if executor.hello.done() and executor.hello.exception() is None:
            log.error("executor %d %s; starting a fresh one", executor.proc.pid, what)
        self._settle_in_flight(what)
        if not planned:  # a replacement we asked for is no sign of an executor that keeps dying
            self._backoff.death()
        if self.executor is executor and (self._restarting is None or self._restarting.done()):
            self._restarting = self.loop.create_task(self._restart())

    def _settle_in_flight(self, what: str) -> None:
        """Each request the dead executor had runs again once, or fails saying why."""
        inflight = self.inflight
        inflight.forget_abandoned()
        lost = sorted(self._instances)
        self._instances.clear()
        self._fast_id = None
        for rid, request in list(inflight.requests.items()):
            if request.attempts == 0:
                continue  # not handed over yet: it goes to the fresh executor
            if inflight.retry(request):
                self.loop.create_task(self._dispatch(rid, request))
                continue
            message = f"the executor process running this request {what}"
            if request.attempts > 1:
                message += " (the request ran twice, and the executor died both times)"
            if lost:
                message += (
                    f"; class instances it held were lost ({', '.join(lost)}): the next call "
                    "with one of those instance_ids builds it again"
                )
            self._answer(rid, request.failure(message))

    async def _restart(self) -> None:
        while not self._closing:
            delay = self._backoff.delay()
            if delay:
                log.warning("executor keeps dying: next start in %.1f s", delay)
                await asyncio.sleep(delay)
            try:
                self.spawn()
                assert self.executor is not None
                await self._await_hello(self.executor)
            except (ExecutorUnavailable, OSError) as exc:
                self.problem = str(exc)
                log.error("%s", exc)
                self._backoff.death()
                continue
            self.restarts += 1
            return
