"""Built-in plugin ``flashrt.deployed``: serve code-less requests from the deployed app.

A deployed worker (``FLASH_RESOURCE_NAME`` set) has its code in the unpacked ``flash build``
artifact, not in the requests. A :class:`~flashrt_core.protocol.FunctionRequest` without
``function_code`` / ``class_code`` that names a function or class of the manifest's
``function_registry`` is served by importing the entry's ``module`` from the app directory and
calling it (classes are built from the request's constructor arguments and kept in the runtime's
:class:`~flashrt_core.instances.InstanceRegistry`, like live ones). This is the path worker-flash
1.0 served for older manifests.

The plugin declines (returns ``None``) whenever the request carries code, so the exec-based
executors handle live requests, and whenever the worker is not deployed. In deployed mode a name
the manifest does not list, or an app that failed to unpack, is a clear error naming the cause.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any

from ..deployment import (
    MANIFEST_FILE,
    DeployedAppUnavailable,
    deployed_app_dir,
    load_manifest,
)
from ..errors import StageError
from ..hookspecs import hookimpl
from .volume_settings import VolumeSettingsOwner

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping
    from pathlib import Path

    from ..context import PluginContext
    from ..instances import InstanceRegistry
    from ..invocation import Invocation
    from ..protocol import FunctionRequest

__all__ = [
    "MANIFEST_FILE",
    "DeployedAppUnavailable",
    "DeployedPlugin",
    "deployed_app_dir",
    "load_manifest",
]


async def _manifest(context: PluginContext, app_dir: Path, wait_s: float) -> Mapping[str, Any]:
    """The manifest, refreshed through ``flashrt_reconcile_manifest`` when a plugin offers to.

    The wait for a refresh is bounded (``wait_s``, and a second more); on a timeout, a failure
    or no answer, the local copy counts.
    """
    path = app_dir / MANIFEST_FILE
    pending = context.pm.hook.flashrt_reconcile_manifest(path=path, context=context)
    if pending is not None:
        try:
            fresh = await asyncio.wait_for(pending, timeout=max(wait_s, 0.01) + 1.0)
        except Exception:  # a refresh problem must not fail the request: use the local copy
            fresh = None
        if isinstance(fresh, dict):
            return fresh
    try:
        return await context.run_blocking(load_manifest, app_dir)
    except DeployedAppUnavailable as exc:
        raise StageError("load code", str(exc)) from None


def _entry(manifest: Mapping[str, Any], name: str, kind: str) -> dict[str, Any]:
    """The manifest's function entry for ``name``; a clear error when it has none."""
    registry = manifest.get("function_registry")
    registry = registry if isinstance(registry, dict) else {}
    resource = registry.get(name)
    if resource is None:
        known = ", ".join(sorted(registry)) or "nothing"
        raise StageError(
            "load code",
            f"{kind} {name!r} is not in the deployed app's function_registry (it lists: {known}); "
            "send its code (live mode) or deploy a build that includes it",
        )
    resources = manifest.get("resources")
    spec = resources.get(resource) if isinstance(resources, dict) else None
    functions = spec.get("functions") if isinstance(spec, dict) else None
    for entry in functions if isinstance(functions, list) else ():
        if isinstance(entry, dict) and entry.get("name") == name:
            if not isinstance(entry.get("module"), str) or not entry["module"]:
                break
            return entry
    raise StageError(
        "load code",
        f"the deployed manifest lists {kind} {name!r} under resource {resource!r} but gives no "
        "module to import it from",
    )


def _import_attr(module_name: str, attr: str) -> Any:
    """Import ``module_name`` (from the app directory on ``sys.path``) and return ``attr``."""
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # user code at import: any failure is a load-code failure
        raise StageError(
            "load code",
            f"importing deployed module {module_name!r} failed: {type(exc).__name__}: {exc}",
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise StageError(
            "load code", f"deployed module {module_name!r} has no attribute {attr!r}"
        ) from None


async def _resolve(
    call: Invocation, name: str, kind: str, wait_s: float
) -> tuple[Any, dict[str, Any]]:
    context = call.context
    try:
        app_dir = deployed_app_dir(context)
    except DeployedAppUnavailable as exc:
        raise StageError("load code", f"the deployed app is unavailable: {exc}") from None
    assert app_dir is not None
    manifest = await _manifest(context, app_dir, wait_s)
    entry = _entry(manifest, name, kind)
    is_class = bool(entry.get("is_class"))
    if is_class != (kind == "class"):
        actual = "class" if is_class else "function"
        raise StageError(
            "load code",
            f"{name!r} is a deployed {actual}; the request asked for a {kind} "
            f"(execution_type {kind!r})",
        )
    target = await context.run_blocking(_import_attr, entry["module"], name)
    return target, entry


def _is_deployed_codeless(code: str | None, context: PluginContext) -> bool:
    return code is None and bool(context.settings.resource_name)


class DeployedPlugin(VolumeSettingsOwner):
    """``flashrt.deployed``; ``volume`` bounds its wait for a manifest refresh."""

    @hookimpl(trylast=True)
    def flashrt_execute_function(
        self, request: FunctionRequest, call: Invocation
    ) -> Awaitable[Any] | None:
        """Call a deployed function named by a code-less request; decline otherwise."""
        if not _is_deployed_codeless(request.function_code, call.context):
            return None
        return _run_function(request, call, self.volume.manifest_wait_s)

    @hookimpl(trylast=True)
    def flashrt_execute_class(
        self, request: FunctionRequest, call: Invocation, instances: InstanceRegistry
    ) -> Awaitable[Any] | None:
        """Call a method of a deployed class's instance named by a code-less request."""
        if not _is_deployed_codeless(request.class_code, call.context):
            return None
        return _run_method(request, call, instances, self.volume.manifest_wait_s)


async def _run_function(request: FunctionRequest, call: Invocation, wait_s: float) -> Any:
    name = request.function_name or ""
    fn, _ = await _resolve(call, name, "function", wait_s)
    if isinstance(fn, type) or not callable(fn):
        raise StageError("load code", f"deployed {name!r} is not a function")
    return await call.call(fn, *call.args, **call.kwargs)


async def _run_method(
    request: FunctionRequest, call: Invocation, instances: InstanceRegistry, wait_s: float
) -> Any:
    from .executors import call_on_instance

    class_name = request.class_name or ""
    cls, _ = await _resolve(call, class_name, "class", wait_s)
    if not isinstance(cls, type):
        raise StageError("load code", f"deployed {class_name!r} is not a class")

    async def build() -> Any:
        return await call.call(cls, *call.constructor_args, **call.constructor_kwargs)

    return await call_on_instance(request, call, instances, build)
