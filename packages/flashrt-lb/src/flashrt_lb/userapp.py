"""Loading a deployed app's ASGI application and driving its lifespan ourselves.

The user's app is not the app uvicorn serves: ours is, so that `/ping` tells the truth and
`/execute` stays under our control. The user's app therefore never sees uvicorn's lifespan
events; :class:`Lifespan` replays the ASGI lifespan protocol to it during our start-up, so its
start-up code (model loading, connections) runs before `/ping` says 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from pathlib import Path

    from starlette.types import ASGIApp, Message

__all__ = ["AppLoadError", "Lifespan", "import_app"]

log = logging.getLogger("flashrt.lb")


class AppLoadError(RuntimeError):
    """The deployed app could not be imported or started; the message says which and why."""


def import_app(app_dir: Path, file_name: str, variable: str) -> ASGIApp:
    """Import ``app_dir/file_name`` as a module and return its ASGI ``variable``.

    Blocking (it runs the user's module-level code): call it in a worker thread. ``app_dir`` must
    already be on ``sys.path`` (the artifact step puts it there) for sibling modules to import.
    """
    path = app_dir / file_name
    if not path.is_file():
        raise AppLoadError(f"deployed app file {file_name!r} not found in {app_dir}")
    module_name = (
        path.stem
        if path.parent == app_dir
        else ".".join(path.relative_to(app_dir).with_suffix("").parts)
    )
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise AppLoadError(f"cannot import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from user code too: report it, keep serving
        sys.modules.pop(module_name, None)
        raise AppLoadError(f"importing {file_name} failed: {type(exc).__name__}: {exc}") from exc
    app = getattr(module, variable, None)
    if app is None:
        raise AppLoadError(f"{file_name} defines no {variable!r} (expected an ASGI app there)")
    if not callable(app):
        raise AppLoadError(
            f"{file_name}: {variable!r} is a {type(app).__name__}, not an ASGI application"
        )
    return app  # type: ignore[no-any-return]


class Lifespan:
    """Runs an ASGI app's lifespan protocol: ``startup()`` once, ``shutdown()`` once.

    An app that does not speak lifespan (it raises before answering ``startup``) is served
    anyway, as uvicorn's ``lifespan="auto"`` does; ``startup.failed`` fails our start-up.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: The state the app's lifespan yielded; merged into each forwarded request's scope.
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._supported = True

    async def startup(self) -> None:
        """Send ``lifespan.startup`` and wait for the app's answer."""
        scope: MutableMapping[str, Any] = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.create_task(self._run(scope), name="flashrt-user-lifespan")
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            return
        if kind == "lifespan.startup.failed":
            raise AppLoadError(f"the app's start-up failed: {message.get('message') or '?'}")
        # The app returned or raised without answering: it does not do lifespan.
        self._supported = False
        if message.get("error") is not None:
            log.info("the deployed app does not support lifespan (%s)", message["error"])

    def cancel(self) -> None:
        """Cancel the app's lifespan (its start-up passed the limit); it gets no shutdown."""
        self._supported = False
        if self._task is not None:
            self._task.cancel()

    async def shutdown(self, timeout_s: float) -> None:
        """Send ``lifespan.shutdown``; give the app ``timeout_s`` to finish it."""
        task = self._task
        if task is None or task.done() or not self._supported:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            message = await asyncio.wait_for(self._from_app.get(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("the deployed app's shutdown did not finish in %.0f s", timeout_s)
            task.cancel()
            return
        if message["type"] == "lifespan.shutdown.failed":
            log.warning("the deployed app's shutdown failed: %s", message.get("message"))
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)

    async def _run(self, scope: MutableMapping[str, Any]) -> None:
        error: BaseException | None = None
        try:
            await self.app(scope, self._to_app.get, self._send)
        except Exception as exc:
            error = exc
        # Unblocks startup()/shutdown() when the app leaves without a final message.
        await self._from_app.put({"type": "flashrt.lifespan.exited", "error": error})

    async def _send(self, message: Message) -> None:
        await self._from_app.put(message)
