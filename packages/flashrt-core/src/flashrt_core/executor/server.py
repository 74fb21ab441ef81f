"""The executor's main loop: read frames, run each request through the pipeline.

One path for every request: the event loop, in the ``flashrt-executor-loop`` thread, reads the
channel and runs each request as a task. Sync user code runs on the main thread when it is
free (:class:`~.main_thread.MainThread`, so ``signal.signal`` works), else in the thread pool;
async user code runs on the loop. The channel is fd 0, close-on-exec, so user code that closes
every descriptor above 2 cannot cut it, and subprocesses never inherit it.
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
from .answering import Answerer, RequestState, Streamer, current_state, exit_now, request_body
from .integrity import Integrity
from .main_thread import MainThread
from .synccalls import SyncCalls

if TYPE_CHECKING:
    from ..deployed_handler import DeployedHandler
    from ..pipeline import Pipeline

__all__ = ["main"]

#: An install stage shorter than this counts toward the request's time limit (no frame sent).
_INSTALL_ANNOUNCE_S = 0.05


class ExecutorServer:
    """The executor's state: channel, pipeline, in-flight tasks and the integrity baseline."""

    def __init__(self, chan: ch.Channel, setup: ch.Setup, lane: MainThread) -> None:
        self.chan = chan
        self.setup = setup
        self.lane = lane
        self.reader = ch.FrameReader(chan.received)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.preloads: set[asyncio.Task[None]] = set()
        self.lanes: Lanes | None = None
        self.pipeline: Pipeline | None = None
        self.integrity: Integrity | None = None
        self.answers: Answerer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handler: DeployedHandler | None = None
        #: Whether start-up installed something (a module the deployed handler missed).
        self.installed = False

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
            self.chan.send(
                ch.Hello(
                    os.getpid(), error=f"{type(exc).__name__}: {exc}", installed=self.installed
                )
            )
            return
        self.integrity = Integrity(loop, self.chan.fd, {}, transient=os.sep + MOUNT_PREFIX)
        imports = carry.ImportReport(sys.path, sys.modules) if settings.carry_imports else None
        self.answers = Answerer(self.chan, self.integrity, settings.timing_log, imports)
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.chan.fd, self._on_readable, gone)
        self.chan.send(ch.Hello(os.getpid(), installed=self.installed))
        await gone

    async def _make_pipeline(self, loop: asyncio.AbstractEventLoop) -> Any:
        from .. import capture
        from ..background import Background
        from ..codecs import preload
        from ..context import PluginContext
        from ..instances import InstanceRegistry
        from ..pipeline import Pipeline, contain_user_tasks
        from ..plugins import get_plugin_manager
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
        # What hooks receive; the start-up hooks ran in the worker, which hands over the app.
        pm = await asyncio.to_thread(get_plugin_manager, settings, extra_plugins=plugins)
        pm.hook.flashrt_configure.call_historic(kwargs={"settings": settings})
        context = PluginContext(settings, pm, lanes, Background())
        if setup.app_dir:
            from ..artifact import ArtifactOutcome, add_app_dir_to_sys_path

            app_dir = Path(setup.app_dir)
            context.artifact = ArtifactOutcome(
                status="ready", app_dir=app_dir, artifact=settings.artifact_path
            )
            add_app_dir_to_sys_path(app_dir)
        instances = InstanceRegistry(settings.max_instances, settings.instance_ttl_s)
        self.pipeline = Pipeline(
            context,
            instances,
            lanes,
            time_limits=False,
            on_phase=self._on_phase,
            on_installed=self._on_installed,
        )
        contain_user_tasks(loop)
        # Pay cloudpickle's import now; the codecs hold it whatever a request does to sys.modules.
        await lanes.run_blocking(preload)
        if setup.deployed_handler:
            from ..autoinstall import install_with_plugins
            from ..handler_loading import load_handler_within

            async def install(distribution: str) -> bool:
                # A module the handler misses goes into this environment; Hello tells the
                # supervisor, which persists the caches.
                changed = await install_with_plugins(context, distribution)
                self.installed = self.installed or changed
                return changed

            # Past the start-up limit this raises: Hello then carries the reason, and this
            # process exits, which ends an import that would never finish.
            self._handler = await load_handler_within(
                lanes,
                Path(setup.app_dir or "."),
                setup.deployed_handler,
                settings.startup_timeout_s,
                settings.startup_progress_s,
                install,
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
        try:
            frames = self.reader.feed(data)
        except ch.ChannelError:  # never from our supervisor: nothing more can be read
            frames = []
            if not gone.done():
                gone.set_result(None)
        for frame in frames:
            if isinstance(frame, ch.Execute):
                self.tasks[frame.id] = self.loop.create_task(self._execute(frame))
            elif isinstance(frame, ch.RunDeployed):
                self.tasks[frame.id] = self.loop.create_task(self._deployed(frame))
            elif isinstance(frame, ch.Cancel):
                task = self.tasks.get(frame.id)
                if task is not None:
                    task.cancel()
            elif isinstance(frame, ch.Preload):
                task = self.loop.create_task(self._preload(frame))
                self.preloads.add(task)
                task.add_done_callback(self.preloads.discard)

    async def _execute(self, frame: ch.Execute) -> None:
        assert self.pipeline is not None and self.answers is not None
        state = RequestState(frame.id)
        current_state.set(state)
        request_id.set(frame.request_id)
        streamer = Streamer(self.chan, frame.id)
        timings = timings_for(self.answers.timing_log)
        try:
            # The body is handed over, not kept here: an out-of-band body's mapping goes as soon
            # as the pipeline has decoded it.
            size = len(frame.body)
            response = await self.pipeline.run(_take_body(frame), streamer, size, timings)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # never from our supervisor
            from ..failures import stage_failure

            response = stage_failure("decode", f"the request frame cannot be read: {exc}")
        except asyncio.CancelledError:
            self._cancelled(state)
            return
        finally:
            self.tasks.pop(frame.id, None)
            streamer.flush()
        self.answers.send(
            frame.id, response, installed=state.installed, timings=timings, note=frame.note
        )

    async def _deployed(self, frame: ch.RunDeployed) -> None:
        assert self.lanes is not None and self.answers is not None
        from ..deployed_handler import run_deployed_job
        from ..stream import Streamed

        state = RequestState(frame.id)
        current_state.set(state)
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
            self._cancelled(state)
            return
        finally:
            self.tasks.pop(frame.id, None)
        if isinstance(output, Streamed):
            self.answers.send_deployed(frame.id, b"", output)
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

    def _cancelled(self, state: RequestState) -> None:
        state.cancelled = True
        if state.sync_running == 0:
            with contextlib.suppress(OSError):
                self.chan.send(ch.Settled(state.id))

    # --- hooks into the runtime -------------------------------------------------------------

    def _on_phase(self, name: str) -> None:
        """The supervisor pauses a request's time limit while it installs. A check that finds
        everything installed takes microseconds: the phase is announced only once it has run
        for :data:`_INSTALL_ANNOUNCE_S`, so the common request sends no frame for it."""
        state = current_state.get()
        if state is None or self.loop is None:
            return
        if name == "install":
            state.install_phase = self.loop.call_later(
                _INSTALL_ANNOUNCE_S, self._announce_install, state
            )
            return
        pending, state.install_phase = state.install_phase, None
        if pending is not None:
            pending.cancel()
        elif state.install_announced:  # the call starts now: so does its time limit
            state.install_announced = False
            self._send_phase(state.id, name)

    def _announce_install(self, state: RequestState) -> None:
        state.install_phase = None
        state.install_announced = True
        self._send_phase(state.id, "install")

    def _send_phase(self, rid: int, name: str) -> None:
        with contextlib.suppress(OSError):
            self.chan.send(ch.Phase(rid, name))

    def _on_installed(self) -> None:
        state = current_state.get()
        if state is not None:
            state.installed = True

    def _loop_intact(self) -> bool:
        return self.integrity is None or self.integrity.loop_intact()


def _take_body(frame: ch.Execute) -> Any:
    """The request the frame carries, which the frame no longer holds."""
    body = request_body(frame)
    frame.body = b""
    return body


def _harden() -> None:
    """Die with the supervisor, keep the channel from children, give user code no stdin."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    os.set_inheritable(0, False)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the process's life


def _read_setup(chan: ch.Channel) -> ch.Setup:
    reader = ch.FrameReader(chan.received)
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
    lane = MainThread()
    server = ExecutorServer(chan, setup, lane)
    thread = threading.Thread(target=server.run, name="flashrt-executor-loop", daemon=True)
    thread.start()
    lane.serve_forever()
    return 0
