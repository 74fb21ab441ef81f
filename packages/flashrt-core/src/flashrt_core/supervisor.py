"""The supervisor: spawns the executor process, hands it requests, survives whatever it does.

It lives on the worker's event loop (the shells' ``Runtime``). The executor is a fresh
interpreter (:mod:`flashrt_core.executor_process`) whose stdin is our end of a socketpair
(:mod:`flashrt_core.channel`); a simple request alone in flight goes over a second one, the fast
lane, whose answer the loop awaits without sleeping for a short while.

Its death is seen at once, through EOF on the channel or its pidfd becoming readable, never a
poll. Every request in flight then either runs again on a fresh executor (once) or is answered
with what happened and the output it produced so far. Time limits are applied here: a request
past its limit is answered at once, and an executor whose code keeps running past the grace
period is recycled so the runaway code stops using the CPU or GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec

from . import channel as ch
from .executor_process import ExecutorProcess, ExecutorUnavailable, describe_exit
from .failures import stage_failure
from .logs import request_id
from .protocol import FunctionResponse
from .request_peek import peek_request
from .settings import settings_to_dict

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .echo import LineEcho
    from .protocol import FunctionRequest
    from .runtime import Runtime

__all__ = ["ExecutorUnavailable", "Supervisor", "describe_exit"]

log = logging.getLogger("flashrt.supervisor")

_RESTART_WINDOW_S = 60.0
RETRIED_NOTE = "[flashrt] the executor process died while this request ran; running it again\n"
_MAX_BACKOFF_S = 10.0


_response = msgspec.msgpack.Decoder(FunctionResponse)


class _Pending:
    """One request handed to the executor, until it is answered."""

    __slots__ = (
        "attempts",
        "body",
        "deployed",
        "echo",
        "form",
        "future",
        "output",
        "output_size",
        "request_id",
        "simple",
        "timeout",
        "timer",
    )

    def __init__(
        self, body: bytes, form: str, timeout: float, deployed: bool, simple: bool = False
    ) -> None:
        self.body = body
        self.form = form
        self.timeout = timeout
        self.deployed = deployed
        self.simple = simple
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.attempts = 0
        self.output: list[str] = []
        self.output_size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.echo: LineEcho | None = None
        self.request_id = request_id.get()


class Supervisor:
    """The worker side of the executor process, used through :class:`~flashrt_core.Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.loop = asyncio.get_running_loop()
        self.executor: ExecutorProcess | None = None
        #: Why no executor is serving now (None while one is, or while starting the first).
        self.problem: str | None = None
        self._ready = asyncio.Event()
        self._pending: dict[int, _Pending] = {}
        self._abandoned: dict[int, asyncio.TimerHandle] = {}
        self._ids = itertools.count(1)
        self._deaths: list[float] = []
        self._instances: set[str] = set()
        self._closing = False
        self._restarting: asyncio.Task[None] | None = None
        self._fast_id: int | None = None  # the request in the fast lane, if one is
        self._spin_s = max(0, self.settings.spin_us) / 1e6
        #: Requests handed to the executor, by lane: "fast" (its main thread) or "loop".
        self.lanes = {"fast": 0, "loop": 0}
        self.restarts = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start a fresh executor interpreter (returns at once; :meth:`start` waits for it)."""
        executor = ExecutorProcess.spawn()
        self.executor = executor
        self.loop.add_reader(executor.chan.fd, self._on_readable, executor, executor.chan)
        self.loop.add_reader(executor.fast.fd, self._on_readable, executor, executor.fast)
        if executor.pidfd is not None:  # without one (old kernels), EOF alone tells
            self.loop.add_reader(executor.pidfd, self._on_exit, executor)

    def _setup(self) -> ch.Setup:
        plugins: list[bytes] = []
        if self.runtime.extra_plugins:
            import cloudpickle

            for plugin in self.runtime.extra_plugins:
                try:
                    plugins.append(cloudpickle.dumps(plugin))
                except Exception as exc:  # its worker-side hooks still run here
                    log.warning(
                        "plugin %r cannot be sent to the executor process (%s): its "
                        "executor-side hooks do not run",
                        self.runtime.pm.get_name(plugin) or plugin,
                        exc,
                    )
        state = self.runtime.state.get("artifact")
        app_dir = getattr(state, "app_dir", None) if getattr(state, "ready", False) else None
        return ch.Setup(
            settings=settings_to_dict(self.settings),
            sys_path=list(sys.path),
            plugins=plugins,
            app_dir=str(app_dir) if app_dir else self._unpacked_dir(),
            deployed_handler=self.runtime.deployed_handler_resource,
        )

    def _unpacked_dir(self) -> str | None:
        """With ``FLASH_DISABLE_UNPACK``, the app already lies in ``FLASHRT_APP_DIR``."""
        if not (self.settings.resource_name and self.settings.disable_unpack):
            return None
        from .builtin.volume_settings import volume_settings

        return str(volume_settings(self.runtime).app_dir)

    async def start(self) -> None:
        """Wait until the executor spawned by :meth:`spawn` is serving; raise if it cannot."""
        executor = self.executor
        if executor is None:
            self.spawn()
            executor = self.executor
        assert executor is not None
        await self._await_hello(executor)

    async def _await_hello(self, executor: ExecutorProcess) -> None:
        # Sent now, not at spawn: the start-up hooks may have unpacked the app meanwhile.
        with contextlib.suppress(OSError):  # a dead executor is reported through hello
            executor.chan.send(self._setup())
        timeout = self.settings.executor_start_timeout_s
        try:
            hello = await asyncio.wait_for(asyncio.shield(executor.hello), timeout)
        except asyncio.TimeoutError:
            self._kill(executor, "did not start in time")
            raise ExecutorUnavailable(
                f"the executor process did not start within {timeout:g} s"
            ) from None
        except ExecutorUnavailable:
            raise
        if hello.error:
            self._kill(executor, "start-up failed")
            raise ExecutorUnavailable(f"the executor process could not start: {hello.error}")
        self.problem = None
        self._ready.set()
        log.info("executor %d ready", hello.pid)

    async def stop(self) -> None:
        """Answer what is left, then TERM the executor and KILL it after the grace period."""
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
        for rid in list(self._pending):
            self._answer(rid, self._stopped_response(rid))
        for handle in self._abandoned.values():
            handle.cancel()
        self._abandoned.clear()
        executor = self.executor
        if executor is None or executor.dead:
            return
        executor.exit_reason = "the worker is stopping"
        executor.terminate_group()
        try:
            await asyncio.wait_for(
                asyncio.to_thread(executor.proc.wait), self.settings.executor_stop_grace_s
            )
        except asyncio.TimeoutError:
            log.warning("executor %d ignored SIGTERM: killing it", executor.proc.pid)
        self._kill(executor, "the worker is stopping")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(executor.proc.wait), 5)
        self._forget(executor)

    def _stopped_response(self, rid: int) -> FunctionResponse:
        pending = self._pending.get(rid)
        return stage_failure(
            "call",
            "the worker stopped before this request finished",
            "".join(pending.output) if pending else None,
        )

    # --- requests ----------------------------------------------------------------------------

    async def execute(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | str
    ) -> FunctionResponse:
        """Run ``request`` in the executor. Never raises (cancellation aside)."""
        try:
            peeked = peek_request(request, self.settings)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return stage_failure("decode", f"invalid request: {exc}")
        result = await self._submit(
            _Pending(peeked.body, peeked.form, peeked.timeout, False, peeked.simple)
        )
        assert isinstance(result, FunctionResponse)
        return result

    async def run_deployed(self, job: Mapping[str, Any]) -> Any:
        """Run the deployed QB handler on one plain job, in the executor."""
        try:
            body = msgspec.json.encode({"id": job.get("id"), "input": job.get("input")})
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return {"success": False, "error": f"the job cannot be encoded: {exc}"}
        return await self._submit(_Pending(body, "json", self.settings.timeout_s, deployed=True))

    async def _submit(self, pending: _Pending) -> Any:
        rid = next(self._ids)
        self._pending[rid] = pending
        try:
            if await self._dispatch(rid, pending) and self._spin_s:
                # The event loop keeps running (other requests are served) but never sleeps
                # while a quick answer is due: waking it would cost more than the call.
                clock = time.perf_counter
                until = clock() + self._spin_s
                while not pending.future.done() and clock() < until:  # noqa: ASYNC110
                    await asyncio.sleep(0)
            return await pending.future
        except asyncio.CancelledError:
            if rid in self._pending:
                self._give_up(rid)
            raise
        finally:
            if pending.timer is not None:
                pending.timer.cancel()
            if pending.echo is not None:
                pending.echo.close()

    async def _dispatch(self, rid: int, pending: _Pending) -> bool:
        """Hand the request to a serving executor (waiting, bounded, for one to be ready).

        ``True`` when it went to the fast lane.
        """
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.settings.executor_start_timeout_s)
            except asyncio.TimeoutError:
                self._answer(
                    rid,
                    stage_failure("call", f"no executor process could be started: {self.problem}"),
                )
                return False
        if rid not in self._pending:  # answered meanwhile (the worker is stopping)
            return False
        executor = self.executor
        assert executor is not None
        pending.attempts += 1
        chan = executor.chan
        if pending.deployed:
            frame: ch.Frame = ch.RunDeployed(rid, pending.body, pending.request_id)
        else:
            frame = ch.Execute(rid, pending.body, pending.form, pending.request_id)
            if (
                pending.simple
                and executor.fast_ok
                and self._fast_id is None
                and len(self._pending) == 1
                and not self._abandoned
            ):
                # Alone in flight, so the executor's main thread is free: it runs this itself.
                chan = executor.fast
                self._fast_id = rid
        self.lanes["fast" if chan is executor.fast else "loop"] += 1
        try:
            chan.send(frame)
        except OSError:
            return False  # it is dying: its death handling retries or answers this request
        pending.timer = self.loop.call_later(pending.timeout, self._timed_out, rid)
        return chan is executor.fast

    def _answer(self, rid: int, response: Any) -> None:
        if rid == self._fast_id:
            self._fast_id = None
        pending = self._pending.pop(rid, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(response)

    def _give_up(self, rid: int) -> None:
        """The caller stopped waiting: tell the executor, and watch that it really stops."""
        self._pending.pop(rid, None)
        if rid == self._fast_id:
            self._fast_id = None  # the abandoned entry keeps the lane closed until it ends
        executor = self.executor
        if executor is None or executor.dead:
            return
        with contextlib.suppress(OSError):
            executor.chan.send(ch.Cancel(rid))
        grace = self.settings.hard_timeout_grace_s
        self._abandoned[rid] = self.loop.call_later(grace, self._runaway, rid, executor)

    def _timed_out(self, rid: int) -> None:
        pending = self._pending.get(rid)
        if pending is None:
            return
        pending.timer = None
        message = f"timed out after {pending.timeout:g} s"
        log.warning("request %s %s", pending.request_id or rid, message)
        if pending.deployed:
            response: Any = {
                "success": False,
                "error": f"the deployed handler {message}",
            }
        else:
            response = stage_failure("call", message, "".join(pending.output) or None)
        self._answer(rid, response)
        self._give_up(rid)

    def _runaway(self, rid: int, executor: ExecutorProcess) -> None:
        self._abandoned.pop(rid, None)
        if executor.dead or executor is not self.executor:
            return
        grace = self.settings.hard_timeout_grace_s
        reason = (
            f"a request's code kept running {grace:g} s past its time limit; the executor was "
            "recycled to stop it"
        )
        log.warning("%s", reason)
        self._kill(executor, reason)

    # --- frames from the executor -----------------------------------------------------------

    def _on_readable(self, executor: ExecutorProcess, chan: ch.Channel) -> None:
        try:
            data = chan.recv_available()
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof(executor)
            return
        for frame in executor.readers[chan.fd].feed(data):
            self._on_frame(executor, frame)

    def _on_frame(self, executor: ExecutorProcess, frame: ch.Frame) -> None:
        if isinstance(frame, ch.Output):
            self._on_output(frame)
        elif isinstance(frame, ch.Result):
            if frame.exiting and executor.exit_reason is None:
                self._retiring(executor, frame.exiting)
            self._on_result(frame)
        elif isinstance(frame, ch.Phase):
            pending = self._pending.get(frame.id)
            if pending is not None and pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
            if pending is not None and frame.name == "call":
                pending.timer = self.loop.call_later(pending.timeout, self._timed_out, frame.id)
        elif isinstance(frame, ch.Settled):
            handle = self._abandoned.pop(frame.id, None)
            if handle is not None:
                handle.cancel()
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

    def _on_output(self, frame: ch.Output) -> None:
        pending = self._pending.get(frame.id)
        if pending is None:
            return
        if self.settings.echo:
            if pending.echo is None:  # made at the first output: most requests print nothing
                from .echo import LineEcho

                pending.echo = LineEcho(
                    self.settings.echo_max_bytes,
                    pending.request_id,
                    streams=self.runtime.echo_streams,
                )
            pending.echo(frame.stream, frame.text)
        room = self.settings.max_output_bytes - pending.output_size
        if room > 0:
            text = frame.text[:room]
            pending.output.append(text)
            pending.output_size += len(text)

    def _on_result(self, frame: ch.Result) -> None:
        handle = self._abandoned.pop(frame.id, None)
        if handle is not None:  # a late answer to a request we gave up on: it has ended
            handle.cancel()
            return
        pending = self._pending.get(frame.id)
        if pending is None:
            return
        if pending.deployed:
            try:
                value: Any = msgspec.msgpack.decode(frame.body)
            except msgspec.DecodeError as exc:
                value = {"success": False, "error": f"the deployed handler's output: {exc}"}
        else:
            try:
                value = _response.decode(frame.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                value = stage_failure("encode result", f"the executor's answer is invalid: {exc}")
            if pending.attempts > 1:  # say so: its side effects may have happened twice
                value.stdout = RETRIED_NOTE + (value.stdout or "")
        if frame.installed:
            self.runtime.persist_caches()
        if frame.instance_id:
            self._instances.add(frame.instance_id)
        self._answer(frame.id, value)

    # --- death and restart ------------------------------------------------------------------

    def _on_exit(self, executor: ExecutorProcess) -> None:
        self._died(executor)

    def _eof(self, executor: ExecutorProcess) -> None:
        """EOF usually means it is exiting: let its pidfd say how, unless it lingers."""
        if executor is self.executor:
            self._ready.clear()  # hand it nothing more
        self.loop.remove_reader(executor.chan.fd)
        self.loop.remove_reader(executor.fast.fd)
        if executor.pidfd is None or executor.proc.poll() is not None:
            self._died(executor)
            return
        self.loop.call_later(1.0, self._linger, executor)

    def _linger(self, executor: ExecutorProcess) -> None:
        if not executor.dead:
            self._kill(executor, executor.exit_reason or "closed its channel")
            self._died(executor)

    def _kill(self, executor: ExecutorProcess, reason: str) -> None:
        executor.kill(reason)

    def _forget(self, executor: ExecutorProcess) -> None:
        if executor.dead:
            return
        self.loop.remove_reader(executor.chan.fd)
        self.loop.remove_reader(executor.fast.fd)
        if executor.pidfd is not None:
            self.loop.remove_reader(executor.pidfd)
        executor.close()

    def _drain(self, executor: ExecutorProcess) -> None:
        """Handle what it sent before it went (an answer, an ``Exiting``) before mourning it."""
        for chan in (executor.fast, executor.chan):
            for _ in range(1024):
                try:
                    data = chan.recv_available()
                except OSError:  # BlockingIOError included: nothing more
                    break
                if not data:
                    break
                for frame in executor.readers[chan.fd].feed(data):
                    self._on_frame(executor, frame)

    def _died(self, executor: ExecutorProcess) -> None:
        if executor.dead:
            return
        self._drain(executor)
        if executor.proc.poll() is None:
            # EOF with the process alive (it closed its channel), or a pidfd event racing the
            # reaper: either way it is no use any more.
            self._kill(executor, executor.exit_reason or "closed its channel")
            with contextlib.suppress(subprocess.TimeoutExpired):
                executor.proc.wait(timeout=5)
        self._forget(executor)
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
        what = executor.exit_reason or describe_exit(executor.proc.returncode)
        planned = executor.exit_reason is not None
        if executor.hello.done() and executor.hello.exception() is None:
            log.error(
                "executor %d %s; starting a fresh one",
                executor.proc.pid,
                what if planned else describe_exit(executor.proc.returncode),
            )
        self._settle_in_flight(what if planned else describe_exit(executor.proc.returncode))
        if not planned:  # a replacement we asked for is no sign of an executor that keeps dying
            self._deaths.append(time.monotonic())
        if self.executor is executor and (self._restarting is None or self._restarting.done()):
            self._restarting = self.loop.create_task(self._restart())

    def _settle_in_flight(self, what: str) -> None:
        for handle in self._abandoned.values():
            handle.cancel()
        self._abandoned.clear()
        lost = sorted(self._instances)
        self._instances.clear()
        retry = self.settings.retry_on_executor_death
        self._fast_id = None
        for rid, pending in list(self._pending.items()):
            if pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
            if pending.attempts == 0:
                continue  # not handed over yet: it goes to the fresh executor
            if retry and pending.attempts < 2:
                pending.output.append(RETRIED_NOTE)
                pending.output_size = sum(len(t) for t in pending.output)
                self.loop.create_task(self._dispatch(rid, pending))
                continue
            message = f"the executor process running this request {what}"
            if pending.attempts > 1:
                message += " (the request ran twice, and the executor died both times)"
            if lost:
                message += (
                    f"; class instances it held were lost ({', '.join(lost)}): the next call "
                    "with one of those instance_ids builds it again"
                )
            stdout = "".join(pending.output) or None
            if pending.deployed:
                self._answer(rid, {"success": False, "error": message, "stdout": stdout})
            else:
                self._answer(rid, stage_failure("call", message, stdout))

    def _backoff(self) -> float:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S]
        recent = len(self._deaths)
        return 0.0 if recent <= 2 else min(0.1 * 2 ** (recent - 3), _MAX_BACKOFF_S)

    async def _restart(self) -> None:
        while not self._closing:
            delay = self._backoff()
            if delay:
                log.warning("executor keeps dying: next start in %.1f s", delay)
                await asyncio.sleep(delay)
            try:
                self.spawn()
                await self._await_hello(self.executor)  # type: ignore[arg-type]
            except (ExecutorUnavailable, OSError) as exc:
                self.problem = str(exc)
                log.error("%s", exc)
                self._deaths.append(time.monotonic())
                continue
            self.restarts += 1
            return
