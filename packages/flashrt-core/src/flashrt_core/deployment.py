"""The deployed app, in one place: its directory, its manifest, and the generated QB handler.

A deployed worker (``FLASH_RESOURCE_NAME`` set) runs a ``flash build`` artifact, unpacked at
start-up by ``flashrt.artifact`` (or already in ``FLASHRT_APP_DIR`` with
``FLASH_DISABLE_UNPACK``). Its ``flash_manifest.json`` maps code-less requests to modules
(``flashrt.deployed``), and per queue resource ``flash build`` (runpod-flash 1.21) generates a
``handler_<resource>.py`` whose ``handler(job)`` takes plain JSON kwargs in ``job["input"]`` and
returns the plain result, or ``{"success": False, "error", "traceback"}``. That handler is
synchronous (it runs coroutines with ``asyncio.run`` itself), so it is called off the event loop.
For a resource with ``max_concurrency`` > 1 that the manifest marks ``is_async`` (1.21 marks every
function so, and a class with one async method), the handler is ``async def`` and awaits the
function or method: it is awaited on the loop, so its jobs overlap. When what it would await is a
plain ``def`` (awaiting its result fails every job), the function or class the manifest names is
called directly instead, a plain ``def`` in a thread, with the async handler's contract
(:class:`DirectCalls`). Both run where user code runs: the executor process by default. Its
import (a model load, often) is bounded by the start-up limit (:func:`load_handler_within`), so
one that never finishes is reported instead of awaited forever. For a generator function the
handler returns the generator itself: its items are streamed to the caller as they are yielded
(:mod:`flashrt_core.stream`).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import logging
import re
import threading
import traceback
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .autoinstall import MissingPackage, import_installing
from .startup import StartupBound, StartupTimeout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator, Mapping

    from .context import PluginContext
    from .lanes import Lanes
    from .settings import Settings

__all__ = [
    "MANIFEST_FILE",
    "DeployedAppUnavailable",
    "DeployedHandler",
    "DeployedHandlerError",
    "DeployedHandlerTimeout",
    "DirectCalls",
    "HandlerHere",
    "deployed_app_dir",
    "executor_app_dir",
    "handler_step",
    "is_function_request",
    "load_handler",
    "load_handler_within",
    "load_manifest",
    "resource_max_concurrency",
    "run_deployed_job",
]

log = logging.getLogger("flashrt.deployed")

MANIFEST_FILE = "flash_manifest.json"
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DeployedAppUnavailable(RuntimeError):
    """Deployed mode, but the app directory cannot be used; the message says why."""


def deployed_app_dir(context: PluginContext) -> Path | None:
    """The unpacked app's directory, ``None`` when this worker is not deployed.

    Raises :class:`DeployedAppUnavailable` with the reason when unpacking failed or has not run.
    The directory is the context's artifact outcome, recorded by ``flashrt.artifact`` (which,
    with ``FLASH_DISABLE_UNPACK``, records the app already unpacked in ``FLASHRT_APP_DIR``) or,
    in an executor, by its set-up.
    """
    if not context.settings.resource_name:
        return None
    outcome = context.artifact
    if outcome is None:
        raise DeployedAppUnavailable(
            "the artifact has not been unpacked (start-up did not run or was blocked)"
        )
    if outcome.status == "ready" and outcome.app_dir is not None:
        return Path(outcome.app_dir)
    reason = outcome.reason or f"unpacking is {outcome.status}"
    raise DeployedAppUnavailable(f"the artifact could not be unpacked: {reason}")


_manifest_cache: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}
_manifest_lock = threading.Lock()


def load_manifest(app_dir: Path) -> dict[str, Any]:
    """Read ``flash_manifest.json`` of the app (parsed once per file version). Blocking."""
    path = app_dir / MANIFEST_FILE
    try:
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        with _manifest_lock:
            cached = _manifest_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeployedAppUnavailable(
            f"the deployed app has no {MANIFEST_FILE} in {app_dir}"
        ) from None
    except (OSError, ValueError) as exc:
        raise DeployedAppUnavailable(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise DeployedAppUnavailable(f"{path} is not a JSON object")
    with _manifest_lock:
        _manifest_cache[path] = (key, data)
    return data


def resource_max_concurrency(app_dir: Path, resource: str) -> int | None:
    """The ``max_concurrency`` ``flash build`` wrote for ``resource`` (``Endpoint(...,
    max_concurrency=N)``); ``None`` when it wrote none (it leaves the default, 1, out). Blocking.

    Raises :class:`DeployedAppUnavailable` when the manifest cannot be read and ``ValueError``
    naming the problem when it has no such resource or the value is not a whole number >= 1.
    """
    resources = load_manifest(app_dir).get("resources")
    spec = resources.get(resource) if isinstance(resources, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"{MANIFEST_FILE} has no resource {resource!r}")
    value = spec.get("max_concurrency")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"resource {resource!r} of {MANIFEST_FILE} has max_concurrency {value!r}, "
            "not a whole number of at least 1"
        )
    return value


class DeployedHandlerError(RuntimeError):
    """The generated handler cannot be loaded; the message says why."""


class DeployedHandlerTimeout(DeployedHandlerError):
    """The handler's import passed the start-up limit; it still runs in a thread of its own."""


def is_function_request(job_input: Any) -> bool:
    """Whether a deployed worker's job input is a FunctionRequest rather than plain kwargs.

    Live clients always send ``execution_type`` and the code; code-less requests for the
    manifest's ``function_registry`` send ``execution_type`` with ``function_name`` or
    ``class_name``. Plain kwargs of a user function would have to use those names together.
    """
    if not isinstance(job_input, dict):
        return False
    if "function_code" in job_input or "class_code" in job_input:
        return True
    return "execution_type" in job_input and (
        "function_name" in job_input or "class_name" in job_input
    )


class DeployedHandler:
    """The loaded ``handler`` of ``handler_<resource>.py``.

    The generated handler of a generator function returns the generator (sync or async)
    unstarted: its items are then pulled one at a time (a sync one's in the user's sync lane,
    an async one's on the loop) and each goes to ``on_item`` as soon as it is yielded; without
    ``on_item`` they are gathered and the list is the output (what ``--test_input`` shows).

    ``direct``: the user's code called as what it is, instead of a concurrent (``async``)
    handler that would ``await`` a plain ``def`` (see :class:`DirectCalls`).
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Any]], Any],
        resource: str,
        direct: DirectCalls | None = None,
    ) -> None:
        self.fn = fn
        self.resource = resource
        self.is_async = inspect.iscoroutinefunction(fn)
        self.direct = direct
        self.yields = inspect.isasyncgenfunction(fn)

    async def __call__(
        self,
        lanes: Lanes,
        job: Mapping[str, Any],
        on_item: Callable[[bytes], None] | None = None,
        max_item_bytes: int | None = None,
    ) -> Any:
        """Run one job; a raised exception becomes the job's error (the SDK's shape). A
        generator's items go to ``on_item`` (JSON, each at most ``max_item_bytes``), and the
        answer is then :class:`~flashrt_core.stream.Streamed`."""
        payload = {"id": job.get("id"), "input": job.get("input")}
        try:
            if self.direct is not None:
                result = await self.direct(lanes, payload["input"])
            elif self.yields:
                result = self.fn(payload)
            elif self.is_async:
                result = await self.fn(payload)
            else:
                result = await lanes.run_user_sync(self.fn, payload)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            return {"error": self._raised(exc)}
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            return await self._stream(lanes, result, on_item, max_item_bytes)
        return result

    def _raised(self, exc: BaseException) -> str:
        return (
            f"deployed handler of {self.resource!r} raised {type(exc).__name__}: {exc}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )

    async def _stream(
        self,
        lanes: Lanes,
        items: Generator[Any, Any, Any] | AsyncGenerator[Any, Any],
        on_item: Callable[[bytes], None] | None,
        limit: int | None,
    ) -> Any:
        """Pull the generator's items, each to ``on_item`` as it comes (the runpod SDK's rules:
        an exception, or an item that is a dict with an ``error``, ends the stream with that
        error); an unfinished generator is closed, so its ``finally`` runs."""
        from .stream import Streamed, encode_item, item_too_large

        gathered: list[Any] = []
        sent = 0
        error: str | None = None
        finished = False
        while True:
            try:
                if isinstance(items, AsyncGenerator):
                    item = await anext(items, _END)
                else:
                    item = await lanes.run_user_sync(next, items, _END)
            except Exception as exc:  # a generator that raised is finished
                error, finished = self._raised(exc), True
                break
            if item is _END:
                finished = True
                break
            if isinstance(item, dict) and item.get("error"):
                error = str(item["error"])
                break
            if on_item is None:
                gathered.append(item)
                continue
            try:
                data = encode_item(item)
            except (TypeError, ValueError) as exc:
                error = f"stream item {sent + 1} cannot be sent as JSON: {exc}"
                break
            if limit is not None and len(data) > limit:
                error = item_too_large(sent + 1, len(data), limit)
                break
            on_item(data)
            sent += 1
        if not finished:
            await _close(lanes, items)
        if error is not None:
            log.warning("the stream of %r ended early: %s", self.resource, error.splitlines()[0])
        if on_item is None:
            return {"error": error} if error is not None else gathered
        return Streamed(sent, error)


#: What ``next`` answers for an exhausted generator (StopIteration cannot cross a future).
_END = object()


async def _close(lanes: Lanes, items: Generator[Any, Any, Any] | AsyncGenerator[Any, Any]) -> None:
    """Close a generator left unfinished (its ``finally`` is user code: a sync one's runs in
    the sync lane); what closing raises is not the job's error, which is already decided."""
    try:
        if isinstance(items, AsyncGenerator):
            await items.aclose()
        else:
            await lanes.run_user_sync(items.close)
    except Exception as exc:
        log.warning("closing a deployed generator raised %s: %s", type(exc).__name__, exc)


class DirectCalls:
    """What a concurrent (``async``) generated handler does, calling the user's code as what it
    is: a coroutine function awaited on the loop, a plain ``def`` in a thread (the handler
    would ``await`` its result, which fails every job).

    The handler's contract is kept: kwargs from the job's input, ``__empty`` dropped; for a
    class, ``method`` picks the method of the handler's one instance (needed when it has
    several); the result as it is, or ``{"error", "traceback"}`` when the call raises.
    """

    def __init__(
        self,
        resource: str,
        name: str,
        function: Callable[..., Any] | None = None,
        instance: Any = None,
        methods: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name  # the function's or class's
        self.function = function
        self.instance = instance
        self.methods = dict(methods or {})
        self.log = logging.getLogger(f"handler_{resource}")  # the handler module's logger

    async def __call__(self, lanes: Lanes, job_input: Any) -> Any:
        if job_input is None:
            job_input = {}
        if not isinstance(job_input, dict):
            return {"error": f"Malformed input: expected dict, got {type(job_input).__name__}"}
        job_input.pop("__empty", None)
        where = self.name
        try:
            if self.function is not None:
                target = self.function
            else:
                picked = self._method(job_input.pop("method", None))
                if isinstance(picked, dict):
                    return picked
                where = f"{self.name}.{picked}"
                target = getattr(self.instance, picked)
            if inspect.iscoroutinefunction(target):
                return await target(**job_input)
            result = await lanes.run_user_sync(functools.partial(target, **job_input))
            if inspect.isawaitable(result):  # a callable object whose __call__ is async
                result = await result
            return result
        except Exception as exc:
            self.log.error("Deployed handler error for %s: %s", where, exc, exc_info=True)
            return {"error": str(exc), "traceback": traceback.format_exc()}

    def _method(self, explicit: Any) -> str | dict[str, str]:
        """The method a class job names (the only one, if there is one), or the error."""
        if len(self.methods) == 1:
            return next(iter(self.methods))
        known = ", ".join(sorted(self.methods))
        if explicit is None:
            return {
                "error": f"class {self.name} has multiple methods: {known}. include a "
                '"method" key in the input.'
            }
        if explicit not in self.methods:
            return {"error": f"unknown method '{explicit}' on {self.name}. available: {known}"}
        return str(explicit)


def _direct_calls(module: Any, app_dir: Path, resource: str) -> DirectCalls | None:
    """Calls for an async generated handler that would ``await`` a plain ``def``.

    The manifest names what the handler was generated for (the resource's first function or
    class); the handler module holds the very objects it awaits: the function under its name,
    a class's one instance and its methods (``_instance``, ``_METHODS``). ``None``: everything
    it awaits is a coroutine function, or the manifest or module does not say.
    """
    try:
        resources = load_manifest(app_dir).get("resources")
    except DeployedAppUnavailable as exc:
        log.debug("no manifest to check handler_%s.py against: %s", resource, exc)
        return None
    spec = resources.get(resource) if isinstance(resources, dict) else None
    functions = spec.get("functions") if isinstance(spec, dict) else None
    first = functions[0] if isinstance(functions, list) and functions else None
    if not isinstance(first, dict) or not isinstance(first.get("name"), str):
        return None
    name: str = first["name"]
    if first.get("is_class"):
        instance = getattr(module, "_instance", None)
        methods = getattr(module, "_METHODS", None)
        if instance is None or not isinstance(methods, dict):
            return None
        awaited = [getattr(instance, m, None) for m in methods]
        if all(inspect.iscoroutinefunction(m) for m in awaited if m is not None):
            return None
        return DirectCalls(resource, name, instance=instance, methods=methods)
    target = getattr(module, name, None)
    if (
        target is None
        or isinstance(target, type)
        or not callable(target)
        or inspect.iscoroutinefunction(target)
    ):
        return None
    return DirectCalls(resource, name, function=target)


def load_handler(app_dir: Path, resource: str) -> DeployedHandler:
    """Import ``handler_<resource>`` from the app directory (already on ``sys.path``). Blocking.

    The import runs the user's module code (and, for a class resource, builds its instance).
    Raises :class:`DeployedHandlerError` naming the problem.
    """
    if not _RESOURCE_NAME.match(resource):
        raise DeployedHandlerError(
            f"FLASH_RESOURCE_NAME={resource!r} is not a valid resource name (letters, digits, _)"
        )
    module_name = f"handler_{resource}"
    path = app_dir / f"{module_name}.py"
    if not path.is_file():
        found = sorted(p.stem[len("handler_") :] for p in app_dir.glob("handler_*.py"))
        raise DeployedHandlerError(
            f"{path.name} is not in the deployed app at {app_dir}: FLASH_RESOURCE_NAME="
            f"{resource!r} names no queue resource of this build (it has handlers for: "
            f"{', '.join(found) or 'none'})"
        )
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:
        raise DeployedHandlerError(
            f"importing {path.name} failed: {type(exc).__name__}: {exc}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        ) from exc
    fn = getattr(module, "handler", None)
    if not callable(fn):
        raise DeployedHandlerError(f"{path.name} defines no callable 'handler'")
    where = getattr(module, "__file__", None)
    if where and not Path(where).resolve().is_relative_to(app_dir.resolve()):
        raise DeployedHandlerError(
            f"module {module_name!r} was imported from {where}, not from the app at {app_dir}"
        )
    direct = _direct_calls(module, app_dir, resource) if inspect.iscoroutinefunction(fn) else None
    if direct is not None:
        log.info(
            "%s would await a plain function of %s: plain ones are called in a thread instead",
            path.name,
            direct.name,
        )
    return DeployedHandler(fn, resource, direct)


def handler_step(resource: str) -> str:
    """How the start-up bound names loading ``resource``'s handler (progress and timeout)."""
    return f"importing the deployed handler handler_{resource}.py"


async def load_handler_within(
    lanes: Lanes,
    app_dir: Path,
    resource: str,
    limit_s: float,
    progress_s: float,
    install: Callable[[str], Awaitable[bool]] | None = None,
) -> DeployedHandler:
    """:func:`load_handler` in a thread, bounded by the start-up limit, with progress lines.

    With ``install`` (a distribution's name -> whether it changed the environment), a module
    the import misses is installed and the import runs again
    (:func:`~flashrt_core.autoinstall.import_installing`), within the same limit. An import past
    the limit cannot be stopped: it is left running and :class:`DeployedHandlerTimeout` names
    it and the limit (an executor then exits, which ends it).
    """
    bound = StartupBound(limit_s, progress_s, log)
    try:
        if install is None:
            return await bound.step(
                handler_step(resource), lanes.run_blocking(load_handler, app_dir, resource)
            )
        return await import_installing(
            lambda: lanes.run_blocking(load_handler, app_dir, resource),
            install,
            app_dir=app_dir,
            bound=bound,
            what=handler_step(resource),
        )
    except StartupTimeout as exc:
        raise DeployedHandlerTimeout(str(exc)) from None
    except MissingPackage as exc:
        raise DeployedHandlerError(str(exc)) from exc


class HandlerHere:
    """An in-process worker's deployed handler (an executor loads its own): loaded once,
    within the start-up limit. A failure is kept, so a later call does not start a second
    import behind the first (which may still be running)."""

    def __init__(
        self,
        settings: Settings,
        lanes: Lanes,
        locate: Callable[[], tuple[Path | None, str | None]],
        install: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        self.lanes = lanes
        self._locate = locate  # the app's directory and the resource, read when loading
        self._install = install  # what installs a module the handler's import misses
        self._handler: DeployedHandler | None = None
        self._failure: DeployedAppUnavailable | DeployedHandlerError | None = None

    async def load(self) -> DeployedHandler:
        """The handler; raises :class:`DeployedHandlerError` (:class:`DeployedHandlerTimeout`
        past the limit) or :class:`DeployedAppUnavailable` naming the problem."""
        if self._handler is not None:
            return self._handler
        if self._failure is not None:
            raise self._failure
        app_dir, resource = self._locate()
        if app_dir is None or resource is None:
            raise DeployedAppUnavailable("this worker is not deployed (FLASH_RESOURCE_NAME?)")
        settings = self.settings
        try:
            self._handler = await load_handler_within(
                self.lanes,
                app_dir,
                resource,
                settings.startup_timeout_s,
                settings.startup_progress_s,
                self._install,
            )
        except (DeployedAppUnavailable, DeployedHandlerError) as exc:
            self._failure = exc
            raise
        return self._handler

    async def run(
        self,
        job: Any,
        on_item: Callable[[bytes], None] | None = None,
        max_item_bytes: int | None = None,
    ) -> Any:
        """One plain-JSON job, under the request time limit if one is set; a failure is the job's
        answer."""
        try:
            handler = await self.load()
        except (DeployedAppUnavailable, DeployedHandlerError) as exc:
            return {"success": False, "error": str(exc)}
        timeout = self.settings.time_limit()
        if timeout is None:  # no limit of ours: the platform's execution timeout applies
            return await run_deployed_job(handler, self.lanes, job, on_item, max_item_bytes)
        try:
            return await asyncio.wait_for(
                run_deployed_job(handler, self.lanes, job, on_item, max_item_bytes), timeout
            )
        except asyncio.TimeoutError:
            return {
                "success": False,
                "error": f"the deployed handler timed out after {timeout:g} s",
            }


def executor_app_dir(context: PluginContext) -> str | None:
    """The app directory an executor process is handed: what start-up unpacked (or, with
    ``FLASH_DISABLE_UNPACK``, found already unpacked); ``None`` when there is none."""
    outcome = context.artifact
    if outcome is None or not outcome.ready or outcome.app_dir is None:
        return None
    return str(outcome.app_dir)


async def run_deployed_job(
    handler: DeployedHandler | None,
    lanes: Lanes,
    job: Any,
    on_item: Callable[[bytes], None] | None = None,
    max_item_bytes: int | None = None,
) -> Any:
    """One plain-JSON job through the loaded handler (``None``: this process serves none); a
    generator's items go to ``on_item`` as they come (see :class:`DeployedHandler`)."""
    if handler is None:
        return {
            "success": False,
            "error": "this worker serves no deployed handler (FLASH_RESOURCE_NAME?)",
        }
    return await handler(lanes, job, on_item, max_item_bytes)
