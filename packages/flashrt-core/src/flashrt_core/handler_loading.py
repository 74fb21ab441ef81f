"""Loading the ``flash build``-generated QB handler, ``handler_<resource>.py``, of the app.

Its import runs the user's module code (a model load, often), so it runs where user code runs
(the executor process by default) and is bounded by the start-up limit
(:func:`load_handler_within`): one that never finishes is reported instead of awaited forever,
and a module it misses is installed first (:mod:`flashrt_core.autoinstall`). An in-process
worker loads its handler once (:class:`InProcessHandler`). Calling the loaded handler is
:mod:`flashrt_core.deployed_handler`'s.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .autoinstall import MissingPackage, import_installing
from .deployed_handler import DeployedHandler, run_deployed_job
from .deployment import DeployedAppUnavailable
from .direct_calls import direct_calls_for
from .startup import StartupBound, StartupTimeout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .lanes import Lanes
    from .settings import Settings

__all__ = [
    "DeployedHandlerError",
    "DeployedHandlerTimeout",
    "InProcessHandler",
    "handler_step",
    "load_handler",
    "load_handler_within",
]

log = logging.getLogger("flashrt.deployed")

_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DeployedHandlerError(RuntimeError):
    """The generated handler cannot be loaded; the message says why."""


class DeployedHandlerTimeout(DeployedHandlerError):
    """The handler's import passed the start-up limit; it still runs in a thread of its own."""


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
    direct = (
        direct_calls_for(module, app_dir, resource) if inspect.iscoroutinefunction(fn) else None
    )
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


class InProcessHandler:
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
