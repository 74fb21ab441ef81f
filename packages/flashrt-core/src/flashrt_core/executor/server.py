"""The executor's main loop: read frames, run each request through the pipeline.

Threads: the main thread is the :class:`~.mainlane.MainLane` (sync user code when it is the only
sync call running, the fast lane, simple requests run whole); the event loop runs in
``flashrt-executor-loop``; extra concurrent sync calls go to the thread pool. The channel is fd 0,
close-on-exec, so user code that closes every descriptor above 2 cannot cut it, and
subprocesses never inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .. import channel as ch
from ..lanes import Lanes
from ..logs import configure_logging, request_id
from ..modules import MOUNT_PREFIX
from ..timing import timings_for
from . import carry
from .fastlane import FastLane
from .integrity import Integrity
from .mainlane import MainLane
from .scope import Answers, Scope, Streamer, current_scope, exit_now, request_body
from .synccalls import SyncCalls

if TYPE_CHECKING:
    from ..deployment import DeployedHandler
    from ..pipeline import Pipeline

__all__ = ["main"]


class ExecutorServer:
    """The executor's state: channel, pipeline, in-flight tasks and the integrity baseline."""

    def __init__(
        self, chan: ch.Channel, setup: ch.Setup, lane: MainLane, fast: ch.Channel | None = None
    ) -> None:
        self.chan = chan
        self.setup = setup
        self.lane = lane
        self.fast = fast
        self.reader = ch.FrameReader()
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.preloads: set[asyncio.Task[None]] = set()
        self.lanes: Lanes | None = None
        self.pipeline: Pipeline | None = None
        self.integrity: Integrity | None = None
        self.answers: Answers | None = None
        self.fast_lane: FastLane | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handler: DeployedHandler | None = None

    # --- start-up ---------------------------------------------------------------------------

    def run(self) -> None:
        """Body of the loop thread; the process ends when the supervisor goes away."""
        try:
            asyncio.run(self._main())
        except BaseException:
            # The loop died under us: a request closed its descriptors, say. One running on the
            # main thread answers without the loop, and its integrity check then ends the
            # process; ending it now would lose that answer. (The supervisor bounds its time.)
            self.lane.wait_done()
        finally:
            exit_now(0)

    async def _main(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        try:
            settings = await self._make_pipeline(loop)
        except Exception as exc:
            self.chan.send(ch.Hello(os.getpid(), error=f"{type(exc).__name__}: {exc}"))
            return
        self.integrity = Integrity(
            loop, self.chan.fd, self.lane.fds, transient=os.sep + MOUNT_PREFIX
        )
        imports = carry.ImportReport(sys.path, sys.modules) if settings.carry_imports else None
        self.answers = Answers(self.chan, self.fast, self.integrity, settings.timing_log, imports)
        fast = self.fast is not None and settings.fast_lane
        if fast:
            assert self.fast is not None and self.pipeline is not None and self.lanes is not None
            self.fast_lane = FastLane(
                self.fast,
                self.pipeline,
                self.lanes,
                self.answers,
                loop,
                self.hand_to_loop,
                self.lane,
            )
            self.lane.on_fast = self.fast_lane.on_readable
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.chan.fd, self._on_readable, gone)
        self.chan.send(ch.Hello(os.getpid(), fast=fast))
        await gone

    async def _make_pipeline(self, loop: asyncio.AbstractEventLoop) -> Any:
        from .. import capture
        from ..codecs import preload
        from ..pipeline import contain_user_tasks
        from ..runtime import Runtime
        from ..settings import Settings, settings_from_dict

        setup = self.setup
        settings = settings_from_dict(Settings, setup.settings, isolation="none")
        configure_logging(settings, setup.log_levels)
        # Capture stays installed for the executor's life (it exists to run user code): each
        # request then only routes its output, instead of installing and removing the routers.
        capture.activate()
        plugins: tuple[object, ...] = ()
        if setup.plugins:
            import cloudpickle

            plugins = tuple(cloudpickle.loads(blob) for blob in setup.plugins)
        lanes = self.lanes = Lanes(settings.max_threads)
        lanes.main_lane = SyncCalls(self.chan, self.lane, lanes, self._loop_intact)
        # The object hooks receive as ``runtime``; its start-up hooks ran in the worker.
        runtime = await asyncio.to_thread(Runtime, settings, extra_plugins=plugins, lanes=lanes)
        if setup.app_dir:
            from ..artifact import ArtifactOutcome, add_app_dir_to_sys_path

            app_dir = Path(setup.app_dir)
            runtime.state["artifact"] = ArtifactOutcome(
                status="ready", app_dir=app_dir, artifact=settings.artifact_path
            )
            add_app_dir_to_sys_path(app_dir)
        runtime.ready = True
        self.pipeline = runtime.pipeline(
            in_executor=True, on_phase=self._on_phase, on_installed=self._on_installed
        )
        contain_user_tasks(loop)
        # Pay cloudpickle's import now; the codecs hold it whatever a request does to sys.modules.
        await lanes.run_blocking(preload)
        if setup.deployed_handler:
            from ..deployment import load_handler_within

            # Past the start-up limit this raises: Hello then carries the reason, and this
            # process exits, which ends an import that would never finish.
            self._handler = await load_handler_within(
                lanes,
                Path(setup.app_dir or "."),
                setup.deployed_handler,
                settings.startup_timeout_s,
                settings.startup_progress_s,
            )
        return settings

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
                fast = self.fast_lane  # a simple request runs whole on the main thread if it can
                if not (frame.simple and fast is not None and fast.take(frame, self.chan)):
                    self.tasks[frame.id] = self.loop.create_task(self._execute(frame))
            elif isinstance(frame, ch.RunDeployed):
                self.tasks[frame.id] = self.loop.create_task(self._deployed(frame))
            elif isinstance(frame, ch.Cancel):
                task = self.tasks.get(frame.id)
                if task is not None:
                    task.cancel()
                elif self.fast_lane is not None:
                    self.fast_lane.cancel(frame.id)
            elif isinstance(frame, ch.Preload):
                task = self.loop.create_task(self._preload(frame))
                self.preloads.add(task)
                task.add_done_callback(self.preloads.discard)

    def hand_to_loop(self, frame: ch.Execute) -> None:
        """Any thread: run ``frame`` as a task of the event loop (the fast lane declined it)."""
        assert self.loop is not None

        def start() -> None:
            self.tasks[frame.id] = self.loop.create_task(self._execute(frame))  # type: ignore[union-attr]

        self.loop.call_soon_threadsafe(start)

    async def _execute(self, frame: ch.Execute) -> None:
        assert self.pipeline is not None and self.answers is not None
        scope = Scope(frame.id)
        current_scope.set(scope)
        request_id.set(frame.request_id)
        streamer = Streamer(self.chan, frame.id)
        timings = timings_for(self.answers.timing_log)
        try:
            response = await self.pipeline.run(
                request_body(frame), streamer, len(frame.body), timings
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
        self.answers.send(self.chan, frame.id, response, installed=scope.installed, timings=timings)

    async def _deployed(self, frame: ch.RunDeployed) -> None:
        assert self.lanes is not None and self.answers is not None
        from ..deployment import run_deployed_job
        from ..stream import Streamed, encode_end

        scope = Scope(frame.id)
        current_scope.set(scope)
        request_id.set(frame.request_id)
        on_item = None
        if frame.stream:
            chan, rid = self.chan, frame.id

            def on_item(data: bytes) -> None:  # each item leaves as it is yielded
                chan.send(ch.StreamItem(rid, data))

        try:
            output = await run_deployed_job(
                self._handler,
                self.lanes,
                msgspec.json.decode(frame.job),
                on_item,
                frame.max_item_bytes,
            )
        except asyncio.CancelledError:
            self._cancelled(scope)
            return
        finally:
            self.tasks.pop(frame.id, None)
        if isinstance(output, Streamed):
            self.answers.send_deployed(frame.id, encode_end(output))
            return
        try:
            body = msgspec.msgpack.encode(output)
        except (TypeError, UnicodeEncodeError, msgspec.EncodeError) as exc:
            body = msgspec.msgpack.encode(
                {"success": False, "error": f"the deployed handler's result cannot be sent: {exc}"}
            )
        self.answers.send_deployed(frame.id, body)

    async def _preload(self, frame: ch.Preload) -> None:
        """Import what the last executor's user code imported, in the pool, captured by no
        request (its output goes to the executor's own streams).

        Meant for an executor with no request in flight (a spare): what ``sys.modules`` holds
        afterwards becomes the integrity baseline, whatever changed meanwhile.
        """
        assert self.lanes is not None
        from .. import capture

        capture.use_buffer(None)  # this task's context, which the pool thread runs in
        if self.answers is not None and self.answers.imports is not None:
            self.answers.imports.expect(frame.modules)
        with contextlib.suppress(Exception):  # preload skips its own failures: a last guard
            await self.lanes.run_blocking(carry.preload, frame.modules)
        if self.integrity is not None:
            self.integrity.accept_modules()

    def _cancelled(self, scope: Scope) -> None:
        scope.cancelled = True
        if scope.sync_running == 0:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Settled(scope.id))

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

    def _loop_intact(self) -> bool:
        return self.integrity is None or self.integrity.loop_intact()


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
    lane = MainLane(fast.fd if fast is not None else None, spin_s, chan.fd, ch.EXPECT_POLL_S)
    server = ExecutorServer(chan, setup, lane, fast)
    thread = threading.Thread(target=server.run, name="flashrt-executor-loop", daemon=True)
    thread.start()
    lane.serve_forever()
    return 0
