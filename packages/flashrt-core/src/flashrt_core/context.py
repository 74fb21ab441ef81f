"""What every hook receives as ``context``: the process's settings, plugin manager, thread pool,
background tasks and deployed app, and nothing else.

Hooks used to get the whole ``Runtime``, so a plugin could start requests, poke readiness or
stash anything under a string key, and the executor built a ``Runtime`` only to be that object.
The context is the narrow part: the ``Runtime`` facade (worker side, or in-process) and the
executor each build one and hand it to hooks, the pipeline and every ``Invocation``. A plugin's
own state lives on the plugin object (register an instance), never here: the class has slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    import pluggy

    from .artifact import ArtifactOutcome
    from .background import Background
    from .lanes import Lanes
    from .settings import Settings

__all__ = ["PluginContext"]

T = TypeVar("T")


class PluginContext:
    """The process's side of the plugin API (one per ``Runtime``, one per executor).

    ``artifact`` is the deployed app's :class:`~flashrt_core.artifact.ArtifactOutcome` (``None``
    when the worker is not deployed or start-up has not reached it). It has one writer per
    process: the ``flashrt.artifact`` start-up plugin in the worker (or in-process), the
    executor's set-up (from what the worker's start-up unpacked) in an executor.
    """

    __slots__ = ("_background", "_lanes", "artifact", "pm", "settings")

    def __init__(
        self, settings: Settings, pm: pluggy.PluginManager, lanes: Lanes, background: Background
    ) -> None:
        self.settings = settings
        #: The plugin manager: ``pm.hook.<name>(...)`` calls a hook, as the built-ins do.
        self.pm = pm
        self.artifact: ArtifactOutcome | None = None
        self._lanes = lanes
        self._background = background

    async def run_blocking(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the process's thread pool, in a copy of the caller's context (so a
        request's output is still captured)."""
        return await self._lanes.run_blocking(fn, *args, **kwargs)

    def background(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``awaitable`` off every request's path, as a task of its own: kept referenced,
        its failure logged, waited for (bounded) when the worker shuts down."""
        return self._background.spawn(awaitable)

    def __repr__(self) -> str:
        return f"<PluginContext isolation={self.settings.isolation!r}>"
