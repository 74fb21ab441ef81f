"""The Runtime: one per process, the facade shells and embedders call. It never raises.

``await execute(request)`` returns a :class:`FunctionResponse` for anything it is given. With
``FLASHRT_ISOLATION=process`` (the default) it hands the request to the supervisor
(:mod:`flashrt_core.supervisor`), which runs it in an executor process; with ``none`` it runs the
pipeline (:mod:`flashrt_core.pipeline`) here. Either way it owns the process's lifecycle hooks
and the observers, and builds the :class:`~flashrt_core.context.PluginContext` hooks receive.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, TypeVar

from . import capture
from .background import Background
from .context import PluginContext
from .instances import InstanceRegistry
from .lanes import Lanes
from .plugins import (
    RequestObservers,
    get_plugin_manager,
    observed,
    pickled_for_executors,
    registered_in_code,
)
from .request_peek import Peeked, peek_body
from .settings import Settings, check_isolation, load_settings
from .timing import timings_for

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from typing import TextIO

    from .deployed_handler import DeployedHandler
    from .handler_loading import InProcessHandler
    from .pipeline import Pipeline
    from .plugins import FlashrtPluginManager
    from .protocol import FunctionRequest, FunctionResponse
    from .supervisor import Description, ExecutorSetup, Supervisor

__all__ = ["Runtime"]

log = logging.getLogger("flashrt.runtime")
T = TypeVar("T")


class Runtime:
    """Holds the settings, the plugin manager, the instance registry, the lanes and the plugins'
    context; starts, serves and stops the worker."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugin_manager: FlashrtPluginManager | None = None,
        extra_plugins: tuple[object, ...] = (),
        lanes: Lanes | None = None,
    ) -> None:
        self.settings = settings or load_settings(Settings)
        check_isolation(self.settings)
        self.pm = plugin_manager or get_plugin_manager(self.settings, extra_plugins=extra_plugins)
        if plugin_manager is not None:
            for plugin in extra_plugins:
                self.pm.register(plugin)
        #: Plugins registered in code, which an executor process registers too (cloudpickled).
        self.extra_plugins = registered_in_code(self.pm)
        self.instances = InstanceRegistry(self.settings.max_instances, self.settings.instance_ttl_s)
        self.lanes = lanes or Lanes(self.settings.max_threads)
        self._background = Background()
        #: What hooks receive (never this facade): settings, plugin manager, thread pool,
        #: background tasks, the deployed app's outcome.
        self.context = PluginContext(self.settings, self.pm, self.lanes, self._background)
        self.ready = False
        self.startup_error: str | None = None
        #: Where the live echo writes (1: stdout, 2: stderr); the CLI keeps stdout for its JSON.
        self.echo_streams: Callable[[int], TextIO] = capture.real_stream
        #: Deployed QB mode: the resource whose generated handler serves plain jobs (the shell
        #: sets it before start; the handler is loaded where user code runs).
        self.deployed_handler_resource: str | None = None
        self.supervisor: Supervisor | None = None
        self._pipeline: Pipeline | None = None
        self._deployed: InProcessHandler | None = None  # in-process, deployed: its handler
        self._started: asyncio.Future[None] | None = None
        self.pm.hook.flashrt_configure.call_historic(kwargs={"settings": self.settings})

    @property
    def isolated(self) -> bool:
        """Whether user code runs in an executor process rather than here."""
        return self.settings.isolation == "process"

    @property
    def problem(self) -> str | None:
        """Why no executor is serving right now (one is being started again), if so."""
        return self.supervisor.problem if self.supervisor is not None else None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Run start-up once (later calls wait for the first). Never raises.

        On failure :attr:`startup_error` says why and :attr:`ready` stays false.
        """
        if self._started is not None:
            await asyncio.shield(self._started)
            return
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        try:
            if self.isolated:
                from .supervisor import Supervisor

                # Spawned first: its interpreter starts while the start-up hooks run.
                self.supervisor = Supervisor(
                    self.settings,
                    setup=self._executor_setup,
                    on_installed=self.persist_caches,
                    echo_streams=self.echo_streams,
                )
                self.supervisor.spawn()
            await self._gather(self.pm.hook.flashrt_startup(context=self.context))
            await self._gather(
                self.pm.hook.flashrt_sync_cache(phase="hydrate", context=self.context)
            )
            if self.supervisor is not None:
                await self.supervisor.start()
            else:
                await self._start_here(loop)
            self.ready = True
        except Exception as exc:
            self.startup_error = f"start-up failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.startup_error, exc_info=not isinstance(exc, OSError))
        finally:
            self._started.set_result(None)

    async def _start_here(self, loop: asyncio.AbstractEventLoop) -> None:
        """In-process: user code runs here, so its tasks are contained and its pipeline made."""
        from .codecs import preload
        from .pipeline import contain_user_tasks

        contain_user_tasks(loop)
        self._pipeline = self._make_pipeline()
        # Pay cloudpickle's import before the first request, not during it; the codecs hold it
        # from now on, whatever a request does to sys.modules.
        await self.run_blocking(preload)

    def _make_pipeline(self) -> Pipeline:
        """The in-process pipeline over this runtime's context, instances and lanes, with the
        time limits and observers (an executor's has neither: the worker applies them)."""
        from .pipeline import Pipeline

        return Pipeline(
            self.context,
            self.instances,
            self.lanes,
            observers=RequestObservers(self.context) if observed(self.pm) else None,
            on_installed=self.persist_caches,
        )

    async def load_deployed_handler(self) -> DeployedHandler:
        """Load this process's deployed QB handler once, within the start-up limit (in-process
        mode; an executor loads its own). Raises
        :class:`~flashrt_core.handler_loading.DeployedHandlerError` (a
        :class:`~flashrt_core.handler_loading.DeployedHandlerTimeout` past the limit) or
        :class:`~flashrt_core.deployment.DeployedAppUnavailable` naming the problem; a failure
        is kept, so a later call does not start a second import behind the first."""
        return await self._in_process_handler().load()

    def _in_process_handler(self) -> InProcessHandler:
        if self._deployed is None:
            from .deployment import deployed_app_dir
            from .handler_loading import InProcessHandler

            self._deployed = InProcessHandler(
                self.settings,
                self.lanes,
                lambda: (deployed_app_dir(self.context), self.deployed_handler_resource),
                self.install_distribution,
            )
        return self._deployed

    async def install_distribution(self, distribution: str) -> bool:
        """Install a Python distribution into this process's environment through the installer
        plugins (a deployed app's missing module, at start-up); ``True`` if that changed it,
        and then the caches are persisted. Raises
        :class:`~flashrt_core.autoinstall.MissingPackage` with the installer's error."""
        from .autoinstall import install_with_plugins

        changed = await install_with_plugins(self.context, distribution)
        if changed:
            self.persist_caches()
        return changed

    def _executor_setup(self) -> ExecutorSetup:
        from .deployment import executor_app_dir
        from .supervisor import ExecutorSetup

        plugins = pickled_for_executors(self.pm, self.extra_plugins)
        return ExecutorSetup(
            plugins, executor_app_dir(self.context), self.deployed_handler_resource
        )

    async def shutdown(self) -> None:
        """Let plugins release resources, finish background work (bounded), stop the pool."""
        for result in self.pm.hook.flashrt_shutdown(context=self.context):
            if inspect.isawaitable(result):
                try:
                    await result
                except Exception:
                    log.exception("a plugin's shutdown failed")
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self._background.wait(10)
        self.lanes.shutdown()

    async def _gather(self, results: list[Any]) -> None:
        pending = [r for r in results if inspect.isawaitable(r)]
        if pending:
            await asyncio.gather(*pending)

    # --- helpers for shells (plugins have the same on their context) ----------------------

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the runtime's thread pool, in a copy of the caller's context."""
        return await self.context.run_blocking(fn, *args, **kwargs)

    def background(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run work off the request path; kept referenced and its failures logged."""
        return self.context.background(awaitable)

    def persist_caches(self) -> None:
        """Installs changed the environment: persist the caches, off every request's path."""
        self.background(
            self._gather(self.pm.hook.flashrt_sync_cache(phase="persist", context=self.context))
        )

    # --- requests ----------------------------------------------------------------------------

    def peek(self, body: bytes) -> Peeked:
        """Check a JSON body's shape without decoding its payload; hand the result to
        :meth:`execute`. Raises :class:`~flashrt_core.protocol.RequestError` naming the field
        at fault (``malformed`` when the body is not JSON at all)."""
        return peek_body(body, self.settings)

    def describe(self) -> Description | None:
        """What the supervisor runs now (its executors, their roles and loads); ``None`` in
        process (``FLASHRT_ISOLATION=none``) or before start."""
        return self.supervisor.describe() if self.supervisor is not None else None

    async def execute(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str | Peeked
    ) -> FunctionResponse:
        """Turn ``request`` into a response. Never raises (cancellation aside).

        A :class:`~flashrt_core.request_peek.Peeked` is a body a shell has already peeked at
        (:func:`~flashrt_core.request_peek.peek_body`): it is not read again here.
        """
        if self._started is None or not self._started.done():
            await self.start()  # the executor starts on first use
        if self.supervisor is not None:
            if not observed(self.pm):  # the body goes to the executor unparsed
                return await self.supervisor.execute(request)
            supervisor, observers = self.supervisor, RequestObservers(self.context)
            body = request.body if isinstance(request, Peeked) else request
            return await observers.around(body, lambda: supervisor.execute(request))
        if self._pipeline is None:
            from .failures import stage_failure

            return stage_failure("decode", self.startup_error or "the runtime did not start")
        return await self._execute_here(self._pipeline, request)

    async def execute_json(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str | Peeked
    ) -> bytes:
        """The response's JSON, as the client reads it, for ``request``: what a shell sends.
        Never raises (cancellation aside).

        The JSON is made once, where the request ran (the executor, or here in process), and
        never decoded in this process on its way out: a shell writes these bytes as they are.
        """
        if self.supervisor is not None and not observed(self.pm):
            if self._started is None or not self._started.done():
                await self.start()
            if self.supervisor is not None:
                return await self.supervisor.execute_json(request)
        from .protocol import encode_response

        return encode_response(await self.execute(request))

    async def _execute_here(
        self,
        pipeline: Pipeline,
        request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str | Peeked,
    ) -> FunctionResponse:
        echo = None
        if self.settings.echo:
            from .echo import LineEcho
            from .logs import request_id

            echo = LineEcho(
                self.settings.echo_max_bytes, request_id.get(), streams=self.echo_streams
            )
        timings = timings_for(self.settings.timing_log)
        try:
            body = request.body if isinstance(request, Peeked) else request
            response = await pipeline.run(body, echo, timings=timings)
        finally:
            if echo is not None:
                echo.close()
        timings.log(response)
        return response

    async def run_deployed_job(
        self,
        job: Mapping[str, Any],
        on_item: Callable[[bytes], None] | None = None,
        *,
        max_item_bytes: int | None = None,
    ) -> Any:
        """A deployed endpoint's plain-JSON job through its generated handler, where user code
        runs (see :mod:`flashrt_core.deployed_handler`).

        When the handler yields, each item (its JSON) is passed to ``on_item`` on this loop as
        soon as it is yielded, in order, and the answer is a
        :class:`~flashrt_core.stream.Streamed`; an item over ``max_item_bytes`` stops the
        stream with an error naming its size. Without ``on_item`` the items are gathered into
        a list, which is the output.
        """
        if self._started is None or not self._started.done():
            await self.start()
        if self.startup_error:  # no handler to run it on, in either isolation
            return {"success": False, "error": self.startup_error}
        if self.supervisor is not None:
            return await self.supervisor.run_deployed(job, on_item, max_item_bytes)
        return await self._in_process_handler().run(job, on_item, max_item_bytes)
