"""The one request pipeline: decode, validate modules, resolve deps, arguments, mount, execute
hook, encode; each stage timed.

The in-process runtime awaits it on its loop, an executor on its event loop. It never raises:
every failure is a :class:`FunctionResponse` naming its stage.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import sys
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from . import capture
from .codecs import SMALL_TYPES, check_format, decode_arguments, encode_result
from .deps import DependencyPlan
from .errors import StageError
from .failures import failure_response
from .invocation import Invocation, UserBaseException
from .locks import KeyedLocks
from .logs import request_id
from .modules import ModuleMount, top_level_names, validate_modules
from .protocol import FunctionRequest, FunctionResponse, RequestError, decode_request
from .timing import Timings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from .capture import Listener
    from .context import PluginContext
    from .instances import InstanceRegistry
    from .lanes import Lanes

__all__ = ["Observers", "Pipeline", "contain_user_tasks", "current_request"]

_ENCODE_INLINE_MAX = 1000
_DECODE_INLINE_MAX = 64 * 1024

#: The decoded request the current context serves (an executor answers from it in a pinch).
current_request: contextvars.ContextVar[FunctionRequest | None] = contextvars.ContextVar(
    "flashrt_request", default=None
)


class Observers(Protocol):
    """Who hears of a request's start and end (the worker-side observer hooks)."""

    def started(self, request: FunctionRequest) -> None: ...

    def finished(self, request: FunctionRequest, response: FunctionResponse) -> None: ...


class Pipeline:
    """One process's way from a request to its response.

    ``context`` is what hooks receive (its settings and plugin manager are the pipeline's);
    ``time_limits`` is false in an executor, where the supervisor applies them; ``on_phase``
    hears ``install``/``call`` around installs, ``on_installed`` that an install changed the
    environment.
    """

    def __init__(
        self,
        context: PluginContext,
        instances: InstanceRegistry,
        lanes: Lanes,
        *,
        time_limits: bool = True,
        observers: Observers | None = None,
        on_phase: Callable[[str], None] | None = None,
        on_installed: Callable[[], None] | None = None,
    ) -> None:
        self.context = context
        self.settings = context.settings
        self.pm = context.pm
        self.instances = instances
        self.lanes = lanes
        self.time_limits = time_limits
        self.observers = observers
        self.on_phase = on_phase
        self.on_installed = on_installed
        self._module_locks = KeyedLocks()

    async def run(
        self,
        request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str,
        listener: Listener | None = None,
        size: int | None = None,
        timings: Timings | None = None,
    ) -> FunctionResponse:
        """The response to ``request``; ``listener`` hears every write of the request's code.

        ``size``: the request's encoded size where the caller knows it (an executor's frame).
        """
        timings = timings or Timings()
        timings.request_id = request_id.get()
        buffer = capture.OutputBuffer(self.settings.max_output_bytes, listener)
        token = capture.use_buffer(buffer)
        capture.activate()
        decoded: FunctionRequest | None = None
        try:
            try:
                decoded = self._decode(request, size)
                del request  # a large body (an executor's mapping) goes before the call
                timings.lap("decode")
                response = await self._run(decoded, timings)
            except UserBaseException as exc:
                timings.failed = "call"
                response = failure_response("call", exc.original, exc.original.__traceback__)
            except StageError as exc:
                timings.failed = exc.stage
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
                timings.failed = "call"
                response = failure_response("call", exc, exc.__traceback__)
            response.stdout = buffer.getvalue()
        finally:
            capture.deactivate()
            capture.reset_buffer(token)
            buffer.close()
        if self.observers is not None and decoded is not None:
            self.observers.finished(decoded, response)
        return response

    # --- stages -------------------------------------------------------------------------------

    def _decode(
        self,
        request: FunctionRequest | Mapping[str, Any] | bytes | memoryview | str,
        size: int | None,
    ) -> FunctionRequest:
        limit = self.settings.max_request_bytes
        if isinstance(request, (bytes, memoryview, str)):
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
        current_request.set(decoded)
        return decoded

    async def _run(self, request: FunctionRequest, timings: Timings) -> FunctionResponse:
        if self.observers is not None:
            self.observers.started(request)
        is_class = request.execution_type == "class"
        timings.request = request
        # Cheap checks first: a bad module path must not cost an install.
        files = (
            validate_modules(request.modules, self.settings.max_modules_bytes)
            if request.modules
            else []
        )
        if request.dependencies or request.system_dependencies:
            if self.on_phase is not None:
                self.on_phase("install")
            timings.lap("decode")
            await self._install(request)
            timings.lap("install")
            if self.on_phase is not None:
                self.on_phase("call")
        if _arguments_size(request) > _DECODE_INLINE_MAX:
            invocation = await self.lanes.run_blocking(self._arguments, request, timings)
        else:
            invocation = self._arguments(request, timings)
        timings.lap("arguments")
        if is_class and not request.instance_id:
            request.instance_id = f"{request.class_name}_{uuid.uuid4().hex[:8]}"
        timeout = self.settings.time_limit(request.timeout_s)
        if files:
            value = await self._with_modules(files, invocation, timeout)
        else:
            value = await self._call(invocation, timeout)
        timings.lap("call")
        fmt = request.serialization_format
        if type(value) in SMALL_TYPES or (
            isinstance(value, (str, bytes, list, tuple, dict)) and len(value) < _ENCODE_INLINE_MAX
        ):
            result, json_result = encode_result(value, fmt)
        else:  # maybe large: off the loop
            result, json_result = await self.lanes.run_blocking(encode_result, value, fmt)
        response = FunctionResponse(success=True, result=result, json_result=json_result)
        timings.lap("encode")
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
            self.pm.hook.flashrt_resolve_deps(request=request, plan=plan, context=self.context)
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
            self.on_installed()

    def _arguments(self, request: FunctionRequest, timings: Timings) -> Invocation:
        fmt = request.serialization_format
        args, kwargs = decode_arguments(request.args, request.kwargs, fmt)
        ctor_args: list[Any] = []
        ctor_kwargs: dict[str, Any] = {}
        if request.execution_type == "class" and (
            request.constructor_args or request.constructor_kwargs
        ):
            ctor_args, ctor_kwargs = decode_arguments(
                request.constructor_args, request.constructor_kwargs, fmt, prefix="constructor_"
            )
        return Invocation(
            request,
            self.lanes,
            args,
            kwargs,
            ctor_args,
            ctor_kwargs,
            context=self.context,
            timings=timings,
        )

    async def _with_modules(
        self, files: list[Any], invocation: Invocation, timeout: float | None
    ) -> Any:
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

    async def _call(self, invocation: Invocation, timeout: float | None) -> Any:
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
        if not self.time_limits or timeout is None:
            return await pending  # the supervisor applies the time limit, hard; or there is none
        return await _with_timeout(pending, timeout)


def contain_user_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Make tasks that user code creates unable to stop the process.

    asyncio re-raises ``SystemExit``/``KeyboardInterrupt`` from any task into the event loop. The
    pipeline guards the coroutines it awaits itself; this task factory guards the tasks a
    request's code spawns (recognised by the request's capture context), chaining any existing
    factory.
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


def _arguments_size(request: FunctionRequest) -> int:
    """The encoded arguments' size: large ones are decoded off the loop."""
    try:  # base64 strings, unless the request is broken: then decoding says how
        return sum(map(len, request.args)) + sum(map(len, request.kwargs.values()))
    except TypeError:
        return 0


def _approximate_size(request: FunctionRequest) -> int:
    size = len(request.function_code or "") + len(request.class_code or "")
    for values in (request.args, request.constructor_args):
        size += sum(len(v) for v in values if isinstance(v, str))
    for mapping in (request.kwargs, request.constructor_kwargs, request.modules):
        size += sum(len(v) for v in mapping.values() if isinstance(v, str))
    return size
