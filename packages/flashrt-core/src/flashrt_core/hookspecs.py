"""The flashrt hook specifications, grouped by phase.

pluggy calls hooks synchronously. A hook that has asynchronous work *decides* synchronously (it
returns ``None`` to decline) and returns an awaitable that the runtime awaits; timeouts, output
capture and cancellation are applied by the runtime around that await, so a plugin never has to
re-implement them.

Built-in implementations are registered ``trylast``: any third-party implementation of a
``firstresult`` hook is asked first, whatever the load order.

A hook that needs the process gets ``context``, a :class:`~flashrt_core.context.PluginContext`
(the executor hooks: ``call.context``), never the ``Runtime``: plugins run requests' stages,
they do not start, serve or stop the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping
    from pathlib import Path

    from .context import PluginContext
    from .deps import DependencyPlan
    from .instances import InstanceRegistry
    from .invocation import Invocation
    from .protocol import FunctionRequest, FunctionResponse
    from .settings import Settings

PROJECT_NAME = "flashrt"

#: Which process runs each hook under process isolation ("worker": the supervisor's side).
SIDES = {
    "flashrt_configure": "both",
    "flashrt_startup": "worker",
    "flashrt_shutdown": "worker",
    "flashrt_request_started": "worker",
    "flashrt_request_finished": "worker",
    "flashrt_resolve_deps": "executor",
    "flashrt_execute_function": "executor",
    "flashrt_execute_class": "executor",
    "flashrt_sync_cache": "worker",
    "flashrt_reconcile_manifest": "executor",
}

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- configuration and lifecycle -------------------------------------------------------------


@hookspec(historic=True)
def flashrt_configure(settings: Settings) -> None:
    """Hand the worker's settings to a plugin.

    Historic: a plugin registered after configuration still receives it, once.

    :param settings: the process-wide core :class:`~flashrt_core.settings.Settings`.
    """


@hookspec
def flashrt_startup(context: PluginContext) -> Awaitable[None] | None:
    """Do start-up work before the first request (unpack, warm caches, connect).

    Collected: every plugin gets a turn; awaitables returned are awaited concurrently. The shells
    report the worker ready only once all of them finished; an exception marks start-up failed.

    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


@hookspec
def flashrt_shutdown(context: PluginContext) -> Awaitable[None] | None:
    """Release what start-up acquired; called once when the worker stops.

    Collected; exceptions are logged and do not stop other plugins' shutdown.

    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


# --- around each request ---------------------------------------------------------------------


@hookspec
def flashrt_request_started(request: FunctionRequest, context: PluginContext) -> None:
    """Observe a decoded request before anything runs (metrics, audit logging).

    Collected and synchronous: keep it cheap, it is on every request's path. Exceptions are
    logged and ignored.

    :param request: the decoded request.
    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


@hookspec
def flashrt_request_finished(
    request: FunctionRequest, response: FunctionResponse, context: PluginContext
) -> None:
    """Observe the response before it leaves the runtime.

    Collected and synchronous; exceptions are logged and ignored.

    :param request: the decoded request (``None`` when it could not be decoded).
    :param response: the response about to be returned.
    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


# --- dependencies ----------------------------------------------------------------------------


@hookspec
def flashrt_resolve_deps(
    request: FunctionRequest, plan: DependencyPlan, context: PluginContext
) -> None:
    """Claim the dependency kinds this plugin installs and add a step for them to ``plan``.

    Collected, because independent installers (Python packages, system packages) must all get a
    turn. Within one kind the first claim wins (:meth:`DependencyPlan.claim` returns ``False`` to
    later claimants); third-party plugins are asked before the built-ins, so a conda plugin that
    claims ``"python"`` replaces the uv/pip installer and leaves system installs alone. Validate
    here or in the step: a raised exception fails the request at the *dependencies* stage.
    Only called when the request lists any dependency.

    :param request: the decoded request.
    :param plan: the plan for this request: requested packages, claims, steps.
    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


# --- execution -------------------------------------------------------------------------------


@hookspec(firstresult=True)
def flashrt_execute_function(request: FunctionRequest, call: Invocation) -> Awaitable[Any] | None:
    """Run a function request; return an awaitable of the function's *plain* result.

    firstresult: exactly one executor wins. Return ``None`` to decline (the next implementation
    is asked); the built-in exec-based executor is last. The runtime encodes the result, applies
    the timeout and captures output; raise :class:`~flashrt_core.errors.StageError` to blame a
    stage other than *call* (for example *load code*).

    :param request: the decoded request (``execution_type == "function"``).
    :param call: decoded arguments plus helpers to load code and call it off the event loop.
    """


@hookspec(firstresult=True)
def flashrt_execute_class(
    request: FunctionRequest, call: Invocation, instances: InstanceRegistry
) -> Awaitable[Any] | None:
    """Run a method of a (possibly existing) class instance; return an awaitable of its result.

    firstresult, like :func:`flashrt_execute_function`.

    :param request: the decoded request (``execution_type == "class"``).
    :param call: decoded method and constructor arguments plus loading and calling helpers.
    :param instances: the process-wide registry of live instances keyed by ``instance_id``.
    """


# --- deployed mode and the network volume ----------------------------------------------------


@hookspec
def flashrt_sync_cache(phase: str, context: PluginContext) -> Awaitable[None] | None:
    """Move package caches between the network volume and the local disk.

    Collected: each cache backend gets a turn. ``phase`` is ``"hydrate"`` (once, at start-up,
    before the first request) or ``"persist"`` (after a request's installs added files; the
    runtime schedules it in the background, never on a request's path).

    :param phase: ``"hydrate"`` or ``"persist"``.
    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """


@hookspec(firstresult=True)
def flashrt_reconcile_manifest(
    path: Path, context: PluginContext
) -> Awaitable[Mapping[str, Any] | None] | None:
    """Bring the deployed app's ``flash_manifest.json`` up to date and return its content.

    firstresult: one source of truth for the manifest. The awaitable resolves to the manifest
    (refreshed or kept) or ``None`` when there is none; callers bound how long they wait.

    :param path: the local manifest file.
    :param context: the process's :class:`~flashrt_core.context.PluginContext`.
    """
