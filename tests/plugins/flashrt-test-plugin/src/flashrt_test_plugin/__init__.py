"""A third-party flashrt plugin used by the tests: it proves the entry-point path.

It claims function requests whose ``function_name`` starts with ``plugin_`` (ignoring their
code) and declines every other request, so the built-in executor still serves those. It uses
only what ``docs/plugins.md`` documents: the hook's arguments, ``call.args``/``call.kwargs`` and
the plugin context's ``run_blocking`` (its line is printed from the thread pool, and still lands
in the request's output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flashrt_core import hookimpl

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from flashrt_core import FunctionRequest, Invocation

PREFIX = "plugin_"
EXECUTOR = "flashrt-test-plugin"


@hookimpl
def flashrt_execute_function(request: FunctionRequest, call: Invocation) -> Awaitable[Any] | None:
    """Win for ``plugin_*`` functions; ``None`` (decline) for anything else."""
    name = request.function_name or ""
    if not name.startswith(PREFIX):
        return None
    return _answer(name, call)


async def _answer(name: str, call: Invocation) -> dict[str, Any]:
    await call.context.run_blocking(print, f"{EXECUTOR} ran {name}")
    return {"executor": EXECUTOR, "function": name, "args": call.args, "kwargs": call.kwargs}
