"""The Runtime: one per process, it turns a request into a response and never raises."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import capture
from .codecs import SMALL_TYPES, check_format, decode_arguments, encode_result
from .deps import DependencyPlan
from .errors import StageError
from .failures import failure_response
from .instances import InstanceRegistry
from .invocation import Invocation, UserBaseException
from .locks import KeyedLocks
from .modules import ModuleMount, top_level_names, validate_modules
from .protocol import FunctionRequest, FunctionResponse, RequestError, decode_request
from .settings import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from typing import TextIO

    from .capture import Listener
    from .plugins import FlashrtPluginManager
    from .supervisor import Supervisor

__all__ = ["Runtime"]

log = logging.getLogger("flashrt.runtime")
T = TypeVar("T")


_ENCODE_INLINE_MAX = 1000
_DECODE_INLINE_MAX = 64 * 1024


ISOLATIONS = ("process", "none")


class Runtime:
    """Holds the plugin manager, the instance registry, the thread pool and the caches.

    ``await execute(request)`` returns a :class:`FunctionResponse` for anything it is given.
    With ``FLASHRT_ISOLATION=process`` (the default) it hands the request to a supervised
    executor process (:mod:`flashrt_core.supervisor`); the executor runs the same pipeline
    in-process, as ``Runtime`` with ``role == "executor"``.
    """

    #: "worker": the process's runtime; "executor": the one inside an executor process, whose
    #: start-up hooks ran in the supervisor and whose time limits the supervisor applies.
    role = "worker"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugin_manager: FlashrtPluginManager | None = None,
        extra_plugins: tuple[object, ...] = (),
    ) -> None:
        from .plugins import get_plugin_manager

        self.settings = settings or load_settings(Settings)
        if self.settings.isolation not in ISOLATIONS:
            from .settings import SettingsError

            raise SettingsError(
                f"FLASHRT_ISOLATION={self.settings.isolation!r}: expected 'process' or 'none'"
            )
        self.pm = plugin_manager or get_plugin_manager(self.settings, extra_plugins=extra_plugins)
        if plugin_manager is not None:
            for plugin in extra_plugins:
                self.pm.register(plugin)
        #: Plugins registered in code, which an executor process registers too (cloudpickled).
        self.extra_plugins = _registered_in_code(self.pm)
        self.instances = InstanceRegistry(self.settings.max_instances, self.settings.instance_ttl_s)
        #: Scratch space plugins share; keys are documented in docs/plugins.md.
        self.state: dict[str, Any] = {}
        self.ready = False
        self.startup_error: str | None = None
        self._started: asyncio.Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._module_locks = KeyedLocks()
        self.supervisor: Supervisor | None = None
        #: Where the live echo writes (1: stdout, 2: stderr); the CLI keeps stdout for its JSON.
        self.echo_streams: Callable[[int], TextIO] = capture.real_stream
        #: Set inside an executor: how sync user code is called, and who hears of phases.
        self.user_sync: Callable[..., Awaitable[Any]] | None = None
        self.on_phase: Callable[[str], None] | None = None
        self.on_installed: Callable[[], None] | None = None
        #: Set by an executor's fast lane: on this thread (its main thread) blocking work runs
        #: inline, as no event loop runs there, and ``inline_wait`` runs async user code on the
        #: executor's loop and waits for it.
        self.inline_thread: int | None = None
        self.inline_wait: Callable[[Awaitable[Any]], Any] | None = None
        #: Deployed QB mode: the resource whose generated handler serves plain jobs (the shell
        #: sets it before start; the handler is loaded where user code runs).
        self.deployed_handler_resource: str | None = None
        self._deployed_handler: Any = None
        self.pm.hook.flashrt_configure.call_historic(kwargs={"settings": self.settings})

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
        if not self.isolated:  # isolated, no user code runs in this process to contain
            _contain_user_tasks(loop)
        try:
            if self.isolated:
                from .supervisor import Supervisor

                # Spawned first: its interpreter starts while the start-up hooks run.
                self.supervisor = Supervisor(self)
                self.supervisor.spawn()
            if self.role != "executor":
                await self._gather(self.pm.hook.flashrt_startup(runtime=self))
                await self._gather(self.pm.hook.flashrt_sync_cache(phase="hydrate", runtime=self))
            if self.supervisor is not None:
                await self.supervisor.start()
            else:
                # Pay cloudpickle's import before the first request, not during it; the codecs
                # hold it from now on, whatever a request does to sys.modules.
                from .codecs import preload

                await self.run_blocking(preload)
            self.ready = True
        except Exception as exc:
            self.startup_error = f"start-up failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.startup_error, exc_info=not isinstance(exc, OSError))
        finally:
            self._started.set_result(None)

    @property
    def isolated(self) -> bool:
        """Whether user code runs in an executor process rather than here."""
        return self.role == "worker" and self.settings.isolation == "process"

    async def shutdown(self) -> None:
        """Let plugins release resources, finish background work (bounded), stop the pool."""
        for result in self.pm.hook.flashrt_shutdown(runtime=self):
            if inspect.isawaitable(result):
                try:
                    await result
                except Exception:
                    log.exception("a plugin's shutdown failed")
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _gather(self, results: list[Any]) -> None:
        pending = [r for r in results if inspect.isawaitable(r)]
        if pending:
            await asyncio.gather(*pending)

    # --- helpers for plugins ---------------------------------------------------------------

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.max_threads,
                thread_name_prefix="flashrt",
                initializer=capture.clear_thread_stamp,
            )
        return self._pool

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the runtime's thread pool, in a copy of the caller's context."""
        if self._inline():
            return _call_inline(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ctx = contextvars.copy_context()

        def work() -> None:
            # One thread-safe callback straight into the awaited future: cheaper than
            # run_in_executor's chaining of a concurrent.futures.Future.
            try:
                result = ctx.run(fn, *args, **kwargs)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            except BaseException as exc:  # never let SystemExit & co. reach the event loop
                wrapped = RuntimeError(f"{type(exc).__name__} in a worker thread: {exc}")
                loop.call_soon_threadsafe(_settle, future, None, wrapped)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self.pool.submit(work)
        return await future

    async def run_user_sync(
        self, request: FunctionRequest | None, fn: Callable[..., T], /, *args: Any
    ) -> T:
        """Call sync user code: off the event loop; in an executor, on its main thread if free."""
        if self._inline():
            return fn(*args)  # the fast lane: this is the main thread, and it is ours
        if self.user_sync is not None:
            return await self.user_sync(request, fn, *args)  # type: ignore[no-any-return]
        return await self.run_blocking(fn, *args)

    async def on_loop(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` on the event loop: async user code, or the instance registry's
        build. From an executor's fast lane, that is the executor's loop, and the fast lane
        waits for it: every request's async code shares the one loop."""
        if self.inline_wait is not None and self._inline():
            return self.inline_wait(awaitable)  # type: ignore[no-any-return]
        return await awaitable

    def _inline(self) -> bool:
        """On the fast lane's thread, where no event loop runs."""
        return self.inline_thread is not None and threading.get_ident() == self.inline_thread

    def background(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run work off the request path; kept referenced and its failures logged."""

        async def runner() -> Any:
            # Background work belongs to no request: never capture its output.
            capture.use_buffer(None)
            return await awaitable

        task = asyncio.ensure_future(runner())
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- the request pipeline --------------------------------------------------------------

    async def execute(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | str
    ) -> FunctionResponse:
        """Turn ``request`` into a response. Never raises (cancellation aside)."""
        if self.isolated:
            return await self._execute_isolated(request)
        echo = None
        if self.settings.echo:
            from .echo import LineEcho
            from .logs import request_id

            echo = LineEcho(
                self.settings.echo_max_bytes, request_id.get(), streams=self.echo_streams
            )
        try:
            return await self.execute_here(request, echo)
        finally:
            if echo is not None:
                echo.close()

    async def _execute_isolated(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | str
    ) -> FunctionResponse:
        if self.supervisor is None:
            await self.start()  # the executor starts on first use
        supervisor = self.supervisor
        if supervisor is None:
            from .failures import stage_failure

            return stage_failure("decode", self.startup_error or "the executor is not running")
        decoded: FunctionRequest | None = None
        if self._observed():
            try:
                decoded = decode_request(request)
            except RequestError:
                decoded = None
            else:
                self._notify_started(decoded)
        response = await supervisor.execute(request)
        self._notify_finished(decoded, response)
        return response

    async def run_deployed_job(self, job: Mapping[str, Any]) -> Any:
        """A deployed endpoint's plain-JSON job through its generated handler, where user code
        runs (see :mod:`flashrt_core.deployed_handler`)."""
        if self.isolated:
            if self.supervisor is None:
                await self.start()
            if self.supervisor is None:
                return {"success": False, "error": self.startup_error or "no executor"}
            return await self.supervisor.run_deployed(job)
        handler = self._deployed_handler
        if handler is None:
            from .builtin.deployed import deployed_app_dir
            from .deployed_handler import load_handler

            app_dir = deployed_app_dir(self)
            assert app_dir is not None and self.deployed_handler_resource is not None
            handler = await self.run_blocking(load_handler, app_dir, self.deployed_handler_resource)
            self._deployed_handler = handler
        return await handler(self, job)

    def _observed(self) -> bool:
        hook = self.pm.hook
        return bool(
            hook.flashrt_request_started.get_hookimpls()
            or hook.flashrt_request_finished.get_hookimpls()
        )

    async def execute_here(
        self,
        request: FunctionRequest | Mapping[str, Any] | bytes | str,
        listener: Listener | None = None,
        size: int | None = None,
    ) -> FunctionResponse:
        """The pipeline in this process; ``listener`` hears every write of the request's code.

        ``size``: the request's encoded size where the caller knows it (an executor's frame).
        """
        buffer = capture.OutputBuffer(self.settings.max_output_bytes, listener)
        token = capture.use_buffer(buffer)
        capture.activate()
        decoded: FunctionRequest | None = None
        try:
            try:
                decoded = self._decode(request, size)
                response = await self._run(decoded)
            except UserBaseException as exc:
                response = failure_response("call", exc.original, exc.original.__traceback__)
            except StageError as exc:
                cause = exc.__cause__
                if isinstance(cause, UserBaseException):
                    cause = cause.original
                response = failure_response(
                    exc.stage,
                    exc,
                    cause.__traceback__ if cause else None,
                    message=exc.message,
                    cause=cause,
                )
            except Exception as exc:
                response = failure_response("call", exc, exc.__traceback__)
            response.stdout = buffer.getvalue()
        finally:
            capture.deactivate()
            capture.reset_buffer(token)
            buffer.close()
        if not self.isolated and self.role != "executor":
            self._notify_finished(decoded, response)
        return response

    def _decode(
        self, request: FunctionRequest | Mapping[str, Any] | bytes | str, size: int | None = None
    ) -> FunctionRequest:
        limit = self.settings.max_request_bytes
        if isinstance(request, (bytes, str)):
            size = len(request)
        if size is not None and size > limit:
            raise StageError("decode", f"request of {size} bytes exceeds the limit of {limit}")
        try:
            decoded = decode_request(request)
        except RequestError as exc:
            raise StageError("decode", str(exc)) from None
        # Unmeasured (a parsed mapping or request object): measured by its strings.
        if size is None and (size := _approximate_size(decoded)) > limit:
            raise StageError(
                "decode", f"request of about {size} bytes exceeds the limit of {limit}"
            )
        if decoded.timeout_s is not None and not decoded.timeout_s > 0:
            raise StageError(
                "decode",
                f"timeout_s must be a positive number of seconds, got {decoded.timeout_s!r}",
            )
        check_format(decoded.serialization_format)
        if decoded.execution_type not in ("function", "class"):
            raise StageError(
                "decode",
                f"execution_type {decoded.execution_type!r} is not supported "
                "(use 'function' or 'class')",
            )
        return decoded

    def _notify_started(self, request: FunctionRequest) -> None:
        started = self.pm.hook.flashrt_request_started
        if started.get_hookimpls():  # skip pluggy's call machinery when nobody listens
            try:
                started(request=request, runtime=self)
            except Exception:
                log.exception("a request_started hook failed")

    async def _run(self, request: FunctionRequest) -> FunctionResponse:
        if self.role != "executor":
            self._notify_started(request)
        # Cheap checks first: a bad module path must not cost an install.
        files = (
            validate_modules(request.modules, self.settings.max_modules_bytes)
            if request.modules
            else []
        )
        if request.dependencies or request.system_dependencies:
            if self.on_phase is not None:
                self.on_phase("install")
            await self._install(request)
            if self.on_phase is not None:
                self.on_phase("call")
        invocation = await self._decode_arguments(request)
        is_class = request.execution_type == "class"
        if is_class and not request.instance_id:
            request.instance_id = f"{request.class_name}_{uuid.uuid4().hex[:8]}"
        timeout = self.settings.timeout_s if request.timeout_s is None else request.timeout_s
        timeout = min(timeout, self.settings.max_timeout_s)
        if files:
            value = await self._with_modules(files, invocation, timeout)
        else:
            value = await self._call(invocation, timeout)
        fmt = request.serialization_format
        if type(value) in SMALL_TYPES or (
            isinstance(value, (str, bytes, list, tuple, dict)) and len(value) < _ENCODE_INLINE_MAX
        ):
            result, json_result = encode_result(value, fmt)
        else:
            result, json_result = await self.run_blocking(encode_result, value, fmt)
        response = FunctionResponse(success=True, result=result, json_result=json_result)
        if is_class and request.instance_id:
            response.instance_id = request.instance_id
            entry = self.instances.get(request.instance_id)
            response.instance_info = entry.info() if entry is not None else None
        return response

    async def _install(self, request: FunctionRequest) -> None:
        plan = DependencyPlan(
            python=tuple(request.dependencies or ()),
            system=tuple(request.system_dependencies or ()),
            accelerate_downloads=request.accelerate_downloads,
        )
        try:
            self.pm.hook.flashrt_resolve_deps(request=request, plan=plan, runtime=self)
        except Exception as exc:
            raise StageError("dependencies", str(exc)) from _plugin_bug(exc)
        for kind, packages in plan.unclaimed().items():
            print(
                f"[flashrt] no installer plugin for {kind} dependencies; not installed: "
                f"{', '.join(packages)}"
            )
        changed = False
        for step in plan.steps():
            try:
                changed = await step.run() or changed
            except Exception as exc:
                raise StageError(
                    "dependencies",
                    f"{step.owner} could not install {', '.join(step.packages)}: {exc}",
                ) from _plugin_bug(exc)
        if changed and self.on_installed is not None:
            self.on_installed()  # the supervisor persists the cache: its hooks run there
        elif changed:
            self.persist_caches()

    def persist_caches(self) -> None:
        """Installs changed the environment: persist the caches, off every request's path."""
        self.background(
            self._gather(self.pm.hook.flashrt_sync_cache(phase="persist", runtime=self))
        )

    async def _decode_arguments(self, request: FunctionRequest) -> Invocation:
        fmt = request.serialization_format
        try:  # base64 strings, unless the request is broken: then decoding says how
            size = sum(map(len, request.args)) + sum(map(len, request.kwargs.values()))
        except TypeError:
            size = 0
        if size > _DECODE_INLINE_MAX:
            args, kwargs = await self.run_blocking(
                decode_arguments, request.args, request.kwargs, fmt
            )
        else:
            args, kwargs = decode_arguments(request.args, request.kwargs, fmt)
        ctor_args: list[Any] = []
        ctor_kwargs: dict[str, Any] = {}
        if request.execution_type == "class" and (
            request.constructor_args or request.constructor_kwargs
        ):
            ctor_args, ctor_kwargs = decode_arguments(
                request.constructor_args, request.constructor_kwargs, fmt, prefix="constructor_"
            )
        return Invocation(request, self, args, kwargs, ctor_args, ctor_kwargs)

    async def _with_modules(self, files: list[Any], invocation: Invocation, timeout: float) -> Any:
        # Requests whose module names collide take turns: sys.modules is process-wide.
        async with self._module_locks.hold(top_level_names(files)):
            mount = ModuleMount(files, self.settings.tmp_dir)
            try:
                try:
                    mount.mount()
                except OSError as exc:
                    raise StageError("load code", f"could not write modules: {exc}") from exc
                return await self._call(invocation, timeout)
            finally:
                mount.unmount()

    async def _call(self, invocation: Invocation, timeout: float) -> Any:
        request = invocation.request
        if request.execution_type == "class":
            pending = self.pm.hook.flashrt_execute_class(
                request=request, call=invocation, instances=self.instances
            )
            what = f"class {request.class_name!r}"
        else:
            pending = self.pm.hook.flashrt_execute_function(request=request, call=invocation)
            what = f"function {request.function_name!r}"
        if pending is None:
            raise StageError(
                "load code",
                f"no executor accepted {what}: the request carries no code and no deployed app "
                "provides it",
            )
        if self.role == "executor":
            return await pending  # the supervisor applies the time limit, hard
        return await _with_timeout(pending, timeout)

    # --- responses ----------------------------------------------------------------------------

    def _notify_finished(self, request: FunctionRequest | None, response: FunctionResponse) -> None:
        finished = self.pm.hook.flashrt_request_finished
        if request is None or not finished.get_hookimpls():
            return
        try:
            finished(request=request, response=response, runtime=self)
        except Exception:
            log.exception("a request_finished hook failed")


def _registered_in_code(pm: FlashrtPluginManager) -> tuple[object, ...]:
    from .plugins import BUILTIN_PLUGINS

    found: list[object] = []
    for name, plugin in pm.list_name_plugin():
        origin = getattr(pm, "origins", {}).get(name, "")
        if plugin is None or name in BUILTIN_PLUGINS or origin.startswith("entry point"):
            continue
        found.append(plugin)
    return tuple(found)


def _contain_user_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make tasks that user code creates unable to stop the worker.

    asyncio re-raises ``SystemExit``/``KeyboardInterrupt`` from any task into the event loop. The
    runtime guards the coroutines it awaits itself; this task factory guards the tasks a request's
    code spawns (recognised by the request's capture context), chaining any existing factory.
    """
    previous = loop.get_task_factory()
    if getattr(previous, "_flashrt_contains", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if capture.current_buffer() is not None and inspect.iscoroutine(coro):
            coro = _contained(coro)
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    factory._flashrt_contains = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


async def _contained(coro: Any) -> Any:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise UserBaseException(exc) from exc


def _plugin_bug(exc: Exception) -> Exception | None:
    """An installer's own verdict (bad input, failed tool) needs no traceback; a bug does."""
    return None if isinstance(exc, (ValueError, RuntimeError, OSError)) else exc


def _call_inline(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``run_blocking``'s contract, on the calling thread."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"{type(exc).__name__} in a worker thread: {exc}") from exc


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting request timed out or was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def _with_timeout(pending: Awaitable[Any], timeout: float) -> Any:
    """Await ``pending`` at most ``timeout`` seconds; past it, it is cancelled."""
    if sys.version_info >= (3, 11):
        # asyncio.timeout cancels in place: no extra task per request, unlike wait_for.
        cm = asyncio.timeout(timeout)
        try:
            async with cm:
                return await pending
        except TimeoutError:
            if cm.expired():
                raise StageError("call", f"timed out after {timeout:g} s") from None
            raise
    try:
        return await asyncio.wait_for(pending, timeout)
    except asyncio.TimeoutError:
        raise StageError("call", f"timed out after {timeout:g} s") from None


def _approximate_size(request: FunctionRequest) -> int:
    size = len(request.function_code or "") + len(request.class_code or "")
    for values in (request.args, request.constructor_args):
        size += sum(len(v) for v in values if isinstance(v, str))
    for mapping in (request.kwargs, request.constructor_kwargs, request.modules):
        size += sum(len(v) for v in mapping.values() if isinstance(v, str))
    return size
