"""The executor's main loop: read frames, run each request through the in-process pipeline.

Threads: the main thread is the :class:`~.mainlane.MainLane` (sync user code when it is the only
sync call running); the event loop runs in ``flashrt-executor-loop``; extra concurrent sync calls
go to the runtime's thread pool. The channel is fd 0, close-on-exec, so user code that closes
every descriptor above 2 cannot cut it, and subprocesses never inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..logs import configure_logging, request_id
from .fastlane import FastLane, builtin_executors_only
from .integrity import Integrity, cuda_context_lost
from .mainlane import MainLane
from .scope import Scope, Streamer, current_scope, encode_response, exit_now, request_body

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..deployed_handler import DeployedHandler
    from ..protocol import FunctionRequest
    from ..runtime import Runtime

__all__ = ["main"]


class ExecutorServer:
    """The executor's state: channel, runtime, in-flight tasks and the integrity baseline."""

    def __init__(
        self, chan: ch.Channel, setup: ch.Setup, lane: MainLane, fast: ch.Channel | None = None
    ) -> None:
        self.chan = chan
        self.setup = setup
        self.lane = lane
        self.fast_lane = FastLane(self, fast) if fast is not None else None
        self.reader = ch.FrameReader()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.runtime: Runtime | None = None
        self.integrity: Integrity | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handler: DeployedHandler | None = None

    # --- start-up ---------------------------------------------------------------------------

    def run(self) -> None:
        """Body of the loop thread; the process ends when the supervisor goes away."""
        try:
            asyncio.run(self._main())
        finally:
            exit_now(0)

    async def _main(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        try:
            runtime = await self._make_runtime()
        except Exception as exc:
            self.chan.send(ch.Hello(os.getpid(), error=f"{type(exc).__name__}: {exc}"))
            return
        if runtime.startup_error:
            self.chan.send(ch.Hello(os.getpid(), error=runtime.startup_error))
            return
        self.integrity = Integrity(loop, self.chan.fd, self.lane.fds)
        fast = (
            self.fast_lane is not None
            and runtime.settings.fast_lane
            and builtin_executors_only(runtime)
        )
        if fast:
            assert self.fast_lane is not None
            self.fast_lane.attach()
            self.lane.on_fast = self.fast_lane.on_readable
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.chan.fd, self._on_readable, gone)
        self.chan.send(ch.Hello(os.getpid(), fast=fast))
        await gone

    async def _make_runtime(self) -> Runtime:
        from ..runtime import Runtime
        from ..settings import Settings, settings_from_dict

        setup = self.setup
        settings = settings_from_dict(Settings, setup.settings, isolation="none")
        configure_logging(settings)
        # Capture stays installed for the executor's life (it exists to run user code): each
        # request then only routes its output, instead of installing and removing the routers.
        from .. import capture

        capture.activate()
        plugins: tuple[object, ...] = ()
        if setup.plugins:
            import cloudpickle

            plugins = tuple(cloudpickle.loads(blob) for blob in setup.plugins)
        runtime = await asyncio.to_thread(Runtime, settings, extra_plugins=plugins)
        runtime.role = "executor"
        runtime.user_sync = self._user_sync
        runtime.on_phase = self._on_phase
        runtime.on_installed = self._on_installed
        if setup.app_dir:
            from ..artifact import ArtifactOutcome, add_app_dir_to_sys_path

            app_dir = Path(setup.app_dir)
            runtime.state["artifact"] = ArtifactOutcome(
                status="ready", app_dir=app_dir, artifact=settings.artifact_path
            )
            add_app_dir_to_sys_path(app_dir)
        self.runtime = runtime
        await runtime.start()
        if not runtime.startup_error and setup.deployed_handler:
            from ..deployed_handler import load_handler

            self._handler = await runtime.run_blocking(
                load_handler, Path(setup.app_dir or "."), setup.deployed_handler
            )
        return runtime

    # --- frames -----------------------------------------------------------------------------

    def _on_readable(self, gone: asyncio.Future[None]) -> None:
        try:
            data = self.chan.recv_available()
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: so is everything we would answer
            if not gone.done():
                gone.set_result(None)
            return
        assert self.loop is not None
        for frame in self.reader.feed(data):
            if isinstance(frame, ch.Execute):
                self.tasks[frame.id] = self.loop.create_task(self._execute(frame))
            elif isinstance(frame, ch.RunDeployed):
                self.tasks[frame.id] = self.loop.create_task(self._deployed(frame))
            elif isinstance(frame, ch.Cancel):
                task = self.tasks.get(frame.id)
                if task is not None:
                    task.cancel()
                elif self.fast_lane is not None:
                    self.fast_lane.cancel(frame.id)

    def hand_to_loop(self, frame: ch.Execute) -> None:
        """Any thread: run ``frame`` as a task of the event loop (the fast lane declined it)."""
        assert self.loop is not None

        def start() -> None:
            self.tasks[frame.id] = self.loop.create_task(self._execute(frame))  # type: ignore[union-attr]

        self.loop.call_soon_threadsafe(start)

    async def _execute(self, frame: ch.Execute) -> None:
        assert self.runtime is not None
        scope = Scope(frame.id)
        current_scope.set(scope)
        request_id.set(frame.request_id)
        streamer = Streamer(self.chan, frame.id)
        try:
            response = await self.runtime.execute_here(
                request_body(frame), streamer, len(frame.body)
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # never from our supervisor
            from ..failures import stage_failure

            response = stage_failure("decode", f"the request frame cannot be read: {exc}")
        except asyncio.CancelledError:
            self._cancelled(scope)
            return
        finally:
            self.tasks.pop(frame.id, None)
            streamer.flush()
        # Checked before answering: the supervisor then sends this executor nothing more.
        reason = self._problem(cuda_context_lost(response))
        result = ch.Result(
            frame.id,
            encode_response(response),
            installed=scope.installed,
            instance_id=response.instance_id,
            exiting=reason,
        )
        self.chan.send(result)
        if reason is not None:
            exit_now(0)

    async def _deployed(self, frame: ch.RunDeployed) -> None:
        assert self.runtime is not None
        scope = Scope(frame.id)
        current_scope.set(scope)
        request_id.set(frame.request_id)
        try:
            if self._handler is None:
                output: Any = {
                    "success": False,
                    "error": "this executor serves no deployed handler (FLASH_RESOURCE_NAME?)",
                }
            else:
                output = await self._handler(self.runtime, msgspec.json.decode(frame.job))
        except asyncio.CancelledError:
            self._cancelled(scope)
            return
        finally:
            self.tasks.pop(frame.id, None)
        try:
            body = msgspec.msgpack.encode(output)
        except (TypeError, UnicodeEncodeError, msgspec.EncodeError) as exc:
            body = msgspec.msgpack.encode(
                {"success": False, "error": f"the deployed handler's result cannot be sent: {exc}"}
            )
        reason = self._problem(None)
        self.chan.send(ch.Result(frame.id, body, exiting=reason))
        if reason is not None:
            exit_now(0)

    def _cancelled(self, scope: Scope) -> None:
        scope.cancelled = True
        if scope.sync_running == 0:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Settled(scope.id))

    def _problem(self, reason: str | None) -> str | None:
        """Why this interpreter can no longer be trusted, if it cannot."""
        assert self.integrity is not None
        return reason or self.integrity.check()

    # --- hooks into the runtime -------------------------------------------------------------

    def _on_phase(self, name: str) -> None:
        scope = current_scope.get()
        if scope is not None:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Phase(scope.id, name))

    def _on_installed(self) -> None:
        scope = current_scope.get()
        if scope is not None:
            scope.installed = True

    async def _user_sync(
        self, request: FunctionRequest | None, fn: Callable[..., Any], *args: Any
    ) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        ctx = contextvars.copy_context()
        scope = current_scope.get()
        if scope is not None:
            scope.sync_running += 1
        on_main: list[bool] = [False]

        def work() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = ctx.run(fn, *args)
            except Exception as exc:
                error = exc
            except BaseException as exc:
                error = RuntimeError(f"{type(exc).__name__} in a worker thread: {exc}")
            if scope is not None:
                scope.sync_running -= 1
            if on_main[0] and request is not None and not self._loop_intact():
                self._rescue(ctx, request, result, error)
            loop.call_soon_threadsafe(_settle, future, result, error)
            if scope is not None and scope.cancelled and scope.sync_running == 0:
                with contextlib.suppress(OSError):
                    self.chan.send(ch.Settled(scope.id))

        on_main[0] = True
        if not self.lane.try_run(work):
            on_main[0] = False
            assert self.runtime is not None
            self.runtime.pool.submit(work)
        return await future

    def _loop_intact(self) -> bool:
        return self.integrity is None or self.integrity.loop_intact()

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

        scope = ctx.get(current_scope)
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
        if scope is not None:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Result(scope.id, encode_response(response), exiting=reason))
        with contextlib.suppress(OSError):
            self.chan.send(ch.Exiting(reason))
        exit_now(0)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _harden() -> None:
    """Die with the supervisor, keep the channel from children, give user code no stdin."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    os.set_inheritable(0, False)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the process's life


def _read_setup(chan: ch.Channel) -> ch.Setup:
    reader = ch.FrameReader()
    poller = select.poll()
    poller.register(chan.fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            data = chan.recv_available()
        except BlockingIOError:
            continue
        if not data:
            raise SystemExit(0)  # the supervisor went away before we started
        for frame in reader.feed(data):
            if isinstance(frame, ch.Setup):
                return frame


def main() -> int:
    """Run the executor until the supervisor closes the channel (or kills us)."""
    _harden()
    chan = ch.Channel(socket.socket(fileno=0))
    setup = _read_setup(chan)
    for entry in reversed(setup.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    fast: ch.Channel | None = None
    fast_fd = os.environ.pop("FLASHRT_EXECUTOR_FAST_FD", "")
    if fast_fd.isdigit():
        os.set_inheritable(int(fast_fd), False)
        fast = ch.Channel(socket.socket(fileno=int(fast_fd)))
    spin_s = max(0, int(setup.settings.get("spin_us", 0))) / 1e6
    lane = MainLane(fast.fd if fast is not None else None, spin_s)
    server = ExecutorServer(chan, setup, lane, fast)
    thread = threading.Thread(target=server.run, name="flashrt-executor-loop", daemon=True)
    thread.start()
    lane.serve_forever()
    return 0
