"""The plugin manager: specs, built-ins, entry points, blocking and tracing in one place."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .hookspecs import PROJECT_NAME

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .context import PluginContext
    from .protocol import FunctionRequest, FunctionResponse
    from .settings import Settings

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "FlashrtPluginManager",
    "PluginError",
    "RequestObservers",
    "describe_plugins",
    "get_plugin_manager",
    "observed",
    "registered_in_code",
]

log = logging.getLogger("flashrt.plugins")

ENTRY_POINT_GROUP = "flashrt"

#: name -> where the plugins that ship with flashrt-core live: a module, or ``module:Class`` for
#: one that owns state (a fresh instance per plugin manager). Their implementations are
#: ``trylast``; block one by name with ``FLASHRT_BLOCKED_PLUGINS`` to drop it entirely.
BUILTIN_PLUGINS: dict[str, str] = {
    "flashrt.executors": "flashrt_core.builtin.executors",
    # After the executors: pluggy asks later registrations first; it declines requests with code.
    "flashrt.deployed": "flashrt_core.builtin.deployed:DeployedPlugin",
    "flashrt.artifact": "flashrt_core.builtin.artifact_startup:ArtifactPlugin",
    "flashrt.volume-cache": "flashrt_core.builtin.volume_cache:VolumeCachePlugin",
    "flashrt.manifest": "flashrt_core.builtin.manifest:ManifestPlugin",
}


class PluginError(RuntimeError):
    """A plugin could not be loaded or implements a hook flashrt does not know."""


class FlashrtPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from, for ``flashrt plugins``."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.origins: dict[str, str] = {}


def get_plugin_manager(
    settings: Settings | None = None, *, extra_plugins: tuple[object, ...] = ()
) -> FlashrtPluginManager:
    """Make the manager: add specs, register built-ins, then entry points, then ``extra_plugins``.

    Raises :class:`PluginError` naming the plugin when one fails to import or implements an
    unknown hook.
    """
    from .settings import Settings, load_settings

    settings = settings or load_settings(Settings)
    pm = FlashrtPluginManager()
    pm.add_hookspecs(hookspecs)
    for name in settings.blocked_plugins:
        pm.set_blocked(name)
    for name, where in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            _register(pm, _import(name, where, "built-in"), name)
            pm.origins[name] = "built-in (flashrt-core)"
    if not settings.disable_plugin_autoload:
        _load_entry_points(pm)
    for plugin in extra_plugins:
        _register(pm, plugin, None)
        pm.origins[pm.get_name(plugin) or repr(plugin)] = "registered in code"
    if settings.trace_hooks:
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        origin = pm.origins.get(name, "registered in code")
        raise PluginError(f"plugin {name!r} ({origin}) is invalid: {exc}") from None
    return pm


def _load_entry_points(pm: FlashrtPluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
        try:
            plugin = _instance(ep.load())
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} from {origin} failed to load ({ep.value}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _register(pm, plugin, ep.name)
        pm.origins[ep.name] = f"entry point {ep.name} = {ep.value} ({origin})"


def _import(name: str, where: str, origin: str) -> Any:
    module_name, _, attr = where.partition(":")
    try:
        module = importlib.import_module(module_name)
        return _instance(getattr(module, attr)) if attr else module
    except Exception as exc:
        raise PluginError(f"{origin} plugin {name!r} failed to load: {exc}") from exc


def _instance(plugin: Any) -> Any:
    """A plugin named by its class is made here, once per plugin manager (so per runtime and
    per executor): the object then owns its state, which no other runtime in the process
    shares. A module or an instance is registered as it is."""
    return plugin() if isinstance(plugin, type) else plugin


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:
        raise PluginError(f"plugin {name or plugin!r} could not be registered: {exc}") from exc
    except pluggy.PluginValidationError as exc:
        hint = ""
        if "{'runtime'}" in str(exc):
            hint = (
                " (hooks receive the PluginContext as 'context', no longer the Runtime as "
                "'runtime': rename the argument; see docs/plugins.md)"
            )
        raise PluginError(f"plugin {name or plugin!r} is invalid: {exc}{hint}") from exc


def describe_plugins(pm: FlashrtPluginManager) -> list[dict[str, Any]]:
    """Every registered plugin: its name, where it came from and the hooks it implements."""
    rows: list[dict[str, Any]] = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        rows.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", None)
                or f"{type(plugin).__module__}.{type(plugin).__qualname__}",
                "origin": pm.origins.get(name, "registered in code"),
                "hooks": hooks,
            }
        )
    return rows


class RequestObservers:
    """The worker-side ``flashrt_request_started`` / ``_finished`` hooks; a failure is logged."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context

    def started(self, request: FunctionRequest) -> None:
        started = self.context.pm.hook.flashrt_request_started
        if started.get_hookimpls():
            try:
                started(request=request, context=self.context)
            except Exception:
                log.exception("a request_started hook failed")

    def finished(self, request: FunctionRequest, response: FunctionResponse) -> None:
        finished = self.context.pm.hook.flashrt_request_finished
        if finished.get_hookimpls():
            try:
                finished(request=request, response=response, context=self.context)
            except Exception:
                log.exception("a request_finished hook failed")

    async def around(
        self, body: Any, run: Callable[[], Awaitable[FunctionResponse]]
    ) -> FunctionResponse:
        """``run()`` between the two hooks. Isolated, only they need the request decoded in
        the worker: a body that does not decode is answered by the executor, unobserved."""
        from .protocol import RequestError, decode_request

        decoded: FunctionRequest | None = None
        with contextlib.suppress(RequestError):
            decoded = decode_request(body)
        if decoded is not None:
            self.started(decoded)
        response = await run()
        if decoded is not None:
            self.finished(decoded, response)
        return response


def observed(pm: FlashrtPluginManager) -> bool:
    """Whether a worker-side observer hook is registered (else no body is decoded for one)."""
    hook = pm.hook
    return bool(
        hook.flashrt_request_started.get_hookimpls()
        or hook.flashrt_request_finished.get_hookimpls()
    )


def pickled_for_executors(pm: FlashrtPluginManager, plugins: tuple[object, ...]) -> list[bytes]:
    """``plugins`` (registered in code) cloudpickled for an executor process; one that cannot
    be is left out, saying so (its worker-side hooks still run)."""
    if not plugins:
        return []
    import cloudpickle

    pickled: list[bytes] = []
    for plugin in plugins:
        try:
            pickled.append(cloudpickle.dumps(plugin))
        except Exception as exc:
            log.warning(
                "plugin %r cannot be sent to the executor process (%s): its executor-side "
                "hooks do not run",
                pm.get_name(plugin) or plugin,
                exc,
            )
    return pickled


def registered_in_code(pm: FlashrtPluginManager) -> tuple[object, ...]:
    """Plugins registered in code (not built in, not entry points): executors get them too."""
    found: list[object] = []
    for name, plugin in pm.list_name_plugin():
        origin = getattr(pm, "origins", {}).get(name, "")
        if plugin is None or name in BUILTIN_PLUGINS or origin.startswith("entry point"):
            continue
        found.append(plugin)
    return tuple(found)
