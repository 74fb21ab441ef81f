"""Calling the user's code directly where a concurrent generated handler would fail.

For a resource with ``max_concurrency`` > 1 the generated ``handler_<resource>.py`` is
``async def`` and awaits the function or method the manifest names; when that is a plain
``def``, awaiting its result fails every job. So the function or class the manifest names is
called directly instead, a plain ``def`` in a thread, with the async handler's contract
(:class:`DirectCalls`); :func:`direct_calls_for` decides, once, when the handler is loaded.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from typing import TYPE_CHECKING, Any

from .deployment import DeployedAppUnavailable, load_manifest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from .lanes import Lanes

__all__ = ["DirectCalls", "direct_calls_for"]

log = logging.getLogger("flashrt.deployed")


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


def direct_calls_for(module: Any, app_dir: Path, resource: str) -> DirectCalls | None:
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
