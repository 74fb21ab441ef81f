"""Deployed QB mode: the ``flash build``-generated ``handler_<resource>.py`` behind the job loop.

It lives in core because it runs where user code runs: in the executor process by default.

``flash build`` (runpod-flash 1.21) generates, per queue resource, a module whose ``handler(job)``
takes plain JSON kwargs in ``job["input"]`` and returns the plain result, or
``{"success": False, "error", "traceback"}``. That handler is synchronous (and runs coroutines
with ``asyncio.run`` itself), so it is called in the runtime's worker threads, never on an event
loop; an ``async def handler`` of a later build is awaited instead.
"""

from __future__ import annotations

import importlib
import inspect
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .runtime import Runtime

__all__ = ["DeployedHandler", "DeployedHandlerError", "is_function_request", "load_handler"]

_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DeployedHandlerError(RuntimeError):
    """The generated handler cannot be loaded; the message says why."""


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
    """The loaded ``handler`` of ``handler_<resource>.py``."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any], resource: str) -> None:
        self.fn = fn
        self.resource = resource
        self.is_async = inspect.iscoroutinefunction(fn)

    async def __call__(self, runtime: Runtime, job: Mapping[str, Any]) -> Any:
        """Run one job; a raised exception becomes the job's error (the SDK's shape)."""
        payload = {"id": job.get("id"), "input": job.get("input")}
        try:
            if self.is_async:
                return await self.fn(payload)
            result = await runtime.run_user_sync(None, self.fn, payload)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:
            return {
                "error": f"deployed handler of {self.resource!r} raised "
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            }


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
    return DeployedHandler(fn, resource)
