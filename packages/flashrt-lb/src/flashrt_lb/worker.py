"""The HTTP worker: honest ``/ping``, ``/execute`` on the Runtime, and the deployed user app.

Start-up (plugins, cache hydration, artifact unpack, the user app's import and lifespan) runs in a
background task started by our lifespan, so uvicorn accepts connections at once and ``/ping``
answers 204 until that task finishes: 200 when it succeeded, 503 with the reason when it failed
(the worker's :class:`~flashrt_core.readiness.Readiness`).
The process stays up either way so the platform can read the reason. The deployed app's import
and lifespan start-up share one limit (``FLASHRT_STARTUP_TIMEOUT_S``, :mod:`flashrt_core.startup`),
so one that never finishes becomes a 503 naming the step rather than a 204 forever.

``/ping`` and ``/execute`` are ours; every other path is forwarded to the deployed app, whose
own ``/ping`` and ``/execute`` are therefore never reachable (they are reserved:
docs/contracts.md, "HTTP").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response
from flashrt_core.autoinstall import MissingPackage, import_installing
from flashrt_core.logs import request_id
from flashrt_core.protocol import RequestError
from flashrt_core.readiness import Readiness, StartupFailed
from flashrt_core.settings import Settings, load_settings
from flashrt_core.startup import StartupBound, StartupTimeout
from starlette.requests import ClientDisconnect

from .request_io import BodyTooLarge, cancelled_if_gone, header, read_body
from .settings import LBSettings
from .userapp import AppLoadError, Lifespan, import_app

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fastapi import Request
    from flashrt_core.runtime import Runtime
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["Worker"]

log = logging.getLogger("flashrt.lb")

#: Scope keys our FastAPI app set that must not leak into the deployed app's request handling.
_OUR_SCOPE_KEYS = frozenset({"router", "app", "route", "endpoint", "path_params"})
_JSON = "application/json"
_request_ids = itertools.count(1)


_PREALLOCATE_MIN = 1 << 20


class _JSONBody(Response):
    """A 200 JSON response whose two headers are made directly."""

    def __init__(self, body: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", str(len(body)).encode("ascii")),
            (b"content-type", b"application/json"),
        ]


def _json(
    status: int, payload: Mapping[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type=_JSON, headers=headers)


class Worker:
    """One HTTP worker: its settings, its Runtime, its readiness and the deployed app it serves.

    ``create_app`` wires it into FastAPI; it is separate so ``create_health_app`` can share it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        lb_settings: LBSettings | None = None,
        *,
        runtime: Runtime | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings or (
            runtime.settings if runtime is not None else load_settings(Settings, environ)
        )
        self.lb = lb_settings or load_settings(LBSettings, environ)
        self.runtime = runtime
        #: Starting (``/ping`` 204), ready (200) or failed with the reason (503).
        self.readiness = Readiness(log, reasons=(AppLoadError,))
        self.user_app: ASGIApp | None = None
        self.user_lifespan: Lifespan | None = None
        #: Whether ``/execute`` runs requests; decided at start-up (it may need the manifest).
        self.execute_enabled = False
        self.max_body = (
            self.lb.max_body_bytes
            if self.lb.max_body_bytes is not None
            else self.settings.max_request_bytes
        )
        self._token = self.lb.token.encode() if self.lb.token else None

    @property
    def deployed(self) -> bool:
        """Deployed mode: the code comes from a built artifact, not from the requests."""
        return bool(self.settings.resource_name) or self.lb.is_mothership

    # --- lifecycle --------------------------------------------------------------------------

    def begin(self) -> None:
        """Start start-up in the background (idempotent); the caller's loop keeps serving."""
        self.readiness.begin(self._start)

    async def wait_started(self) -> None:
        """Wait until start-up finished, either way."""
        self.begin()
        await self.readiness.wait()

    async def _start(self) -> str:
        """The start-up steps; what the ``ready:`` line says."""
        if self.runtime is None:
            from flashrt_core.runtime import Runtime

            # Plugin discovery imports third-party modules: keep it off the event loop.
            self.runtime = await asyncio.to_thread(Runtime, self.settings)
        runtime = self.runtime
        await runtime.start()
        if runtime.startup_error:
            raise AppLoadError(runtime.startup_error)
        app_dir = await self._app_dir(runtime) if self.deployed else None
        if app_dir is not None:
            await self._load_user_app(runtime, app_dir)
        self.execute_enabled = await runtime.run_blocking(self._decide_execute, app_dir)
        return "{} mode, /execute {}{}".format(
            "deployed" if self.deployed else "live",
            "on" if self.execute_enabled else "off",
            ", serving the deployed app" if self.user_app is not None else "",
        )

    async def _app_dir(self, runtime: Runtime) -> Path:
        """The unpacked app's directory, as the core's artifact step recorded it.

        The built-in artifact plugin unpacks when ``FLASH_RESOURCE_NAME`` is set; a legacy
        mothership app without it is unpacked here through the same helper.
        """
        from flashrt_core.artifact import add_app_dir_to_sys_path
        from flashrt_core.builtin.artifact_startup import ensure_artifact
        from flashrt_core.builtin.volume_settings import VolumeSettings
        from flashrt_core.deployment import DeployedAppUnavailable, deployed_app_dir

        if self.settings.resource_name:
            try:
                app_dir = deployed_app_dir(runtime.context)
            except DeployedAppUnavailable as exc:
                raise AppLoadError(str(exc)) from None
            assert app_dir is not None
            return app_dir
        if self.settings.disable_unpack:
            unpacked = Path(load_settings(VolumeSettings).app_dir)
            add_app_dir_to_sys_path(unpacked)
            return unpacked
        with contextlib.suppress(Exception):  # the outcome it records carries the reason
            await ensure_artifact(runtime.context)
        outcome = runtime.context.artifact
        unpacked_dir = None if outcome is None else outcome.app_dir
        if outcome is None or outcome.status != "ready" or unpacked_dir is None:
            reason = (outcome and outcome.reason) or "unpacking did not run"
            raise AppLoadError(f"the artifact could not be unpacked: {reason}")
        return Path(unpacked_dir)

    async def _load_user_app(self, runtime: Runtime, app_dir: Path) -> None:
        if self.lb.is_mothership:
            file_name, variable = self.lb.main_file, self.lb.app_variable
        else:
            file_name, variable = f"handler_{self.settings.resource_name}.py", "app"
        # One limit over both (a model load may sit in either): past it, /ping says 503 naming
        # the step, while a progress line says meanwhile what is still starting.
        bound = StartupBound(self.settings.startup_timeout_s, self.settings.startup_progress_s, log)
        try:
            # Importing runs the user's module code (and its heavy imports): in a thread, which
            # is left running if it passes the limit (a thread cannot be stopped). A module the
            # image lacks is installed here (the app runs in this process), then imported again.
            app = await import_installing(
                lambda: runtime.run_blocking(import_app, app_dir, file_name, variable),
                runtime.install_distribution,
                app_dir=app_dir,
                bound=bound,
                what=f"importing {file_name}",
            )
        except StartupTimeout as exc:
            raise StartupFailed(str(exc), left_running=True) from None
        except MissingPackage as exc:
            raise AppLoadError(str(exc)) from exc
        lifespan = Lifespan(app)
        try:
            await bound.step(f"running the lifespan start-up of {file_name}", lifespan.startup())
        except StartupTimeout as exc:
            lifespan.cancel()
            raise AppLoadError(str(exc)) from None
        self.user_app, self.user_lifespan = app, lifespan

    def _decide_execute(self, app_dir: Path | None) -> bool:
        if self.lb.execute is not None:
            return self.lb.execute
        if not self.deployed:
            return True
        if app_dir is None or not self.settings.resource_name:
            return False
        from flashrt_core.deployment import DeployedAppUnavailable, load_manifest

        try:
            resources = load_manifest(app_dir).get("resources")
        except DeployedAppUnavailable as exc:
            log.warning("/execute stays off: %s", exc)
            return False
        resource = (
            resources.get(self.settings.resource_name) if isinstance(resources, dict) else None
        )
        return isinstance(resource, dict) and resource.get("is_live_resource") is True

    async def stop(self) -> None:
        """Cancel an unfinished start-up, stop the deployed app, then the Runtime."""
        await self.readiness.stop()
        if self.user_lifespan is not None:
            await self.user_lifespan.shutdown(self.lb.shutdown_timeout_s)
        if self.runtime is not None:
            await self.runtime.shutdown()

    # --- handlers ---------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        """204 while starting, 200 when ready, 503 with the reason when start-up failed."""
        phase = self.readiness.phase
        problem = self.runtime.problem if self.runtime is not None else None
        if phase == "ready" and problem:
            # Between executors, and none can be started: say why (one is tried again).
            return _json(503, {"status": "unavailable", "reason": problem})
        if phase == "ready":
            return Response(b'{"status":"ready"}', media_type=_JSON)
        if phase == "starting":
            return Response(status_code=204)
        return _json(503, {"status": "failed", "reason": self.readiness.reason})

    async def execute(self, request: Request) -> Response:
        """The ``/execute`` route of :func:`~flashrt_lb.app.create_app`."""
        return await self.answer(request.scope, request.receive)

    async def serve_execute(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/execute`` as a plain ASGI app, for :func:`~flashrt_lb.app.create_served_app`."""
        try:
            response = await self.answer(scope, receive)
        except ClientDisconnect:  # nobody is left to answer
            return
        await response(scope, receive, send)

    async def answer(self, scope: Scope, receive: Receive) -> Response:
        """Run one FunctionRequest and answer its FunctionResponse (200 even when it failed)."""
        if self._token is not None and not self._authorized(scope):
            return _json(
                401,
                {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
                {"WWW-Authenticate": "Bearer"},
            )
        if self.readiness.phase != "ready":
            await self.wait_started()
            if self.readiness.phase == "failed":
                return _json(
                    503, {"error": "worker start-up failed", "reason": self.readiness.reason}
                )
        if not self.execute_enabled:
            why = (
                "FLASHRT_LB_EXECUTE is false"
                if self.lb.execute is False
                else "this deployed resource is not live; set FLASHRT_LB_EXECUTE=true to enable it"
            )
            return _json(404, {"error": f"/execute is disabled: {why}"})
        assert self.runtime is not None
        try:
            body = await read_body(scope, receive, self.max_body)
        except BodyTooLarge:
            return _json(
                413,
                {"error": f"request body exceeds the limit of {self.max_body} bytes"},
                {"Connection": "close"},
            )
        try:
            # Its shape only: the executor decodes the request, once.
            peeked = self.runtime.peek(body)
        except RequestError as exc:
            return _json(400 if exc.malformed else 422, {"error": str(exc)})
        rid = header(scope, b"x-request-id")
        request_id.set(rid.decode("latin-1") if rid else f"http-{next(_request_ids)}")
        # The response's JSON as the executor made it: written as it is, never decoded here.
        return _JSONBody(await cancelled_if_gone(self.runtime.execute_json(peeked), receive))

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        scheme, _, credentials = (header(scope, b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)

    async def forward(self, scope: Scope, receive: Receive, send: Send, not_found: ASGIApp) -> None:
        """Hand a non-reserved path to the deployed app (after start-up), else 404."""
        starting = self.readiness.phase == "starting"
        if self.deployed and starting and scope["type"] in ("http", "websocket"):
            await self.wait_started()
        app = self.user_app
        if app is None or scope["type"] not in ("http", "websocket"):
            await not_found(scope, receive, send)
            return
        # The app's own routing must see a scope ours has not claimed: Starlette keeps the first
        # router it meets in scope["router"], which would make the app's url_for() search ours.
        scope = {k: v for k, v in scope.items() if k not in _OUR_SCOPE_KEYS}
        lifespan = self.user_lifespan
        if lifespan is not None and lifespan.state:
            scope["state"] = {**scope.get("state", {}), **lifespan.state}
        await app(scope, receive, send)
