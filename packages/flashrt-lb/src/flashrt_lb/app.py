"""The FastAPI apps over a :class:`~flashrt_lb.worker.Worker`: the main one (``/ping``,
``/execute``, every other path forwarded to the deployed app, its lifespan the worker's) and the
health one (``/ping`` alone, for ``PORT_HEALTH``).

Both are plain FastAPI apps with Starlette routes (no dependency solving per request) and
FastAPI's own telemetry off unless ``FLASHRT_LB_TELEMETRY`` asks for it. What the server runs
(:func:`create_served_app`) puts ``POST /execute`` in front of the main one's middleware and
routing.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from .worker import Worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from flashrt_core.runtime import Runtime
    from flashrt_core.settings import Settings
    from starlette.types import ASGIApp, Receive, Scope, Send

    from .settings import LBSettings

__all__ = ["Worker", "create_app", "create_health_app", "create_served_app"]


def create_app(
    settings: Settings | None = None,
    lb_settings: LBSettings | None = None,
    *,
    runtime: Runtime | None = None,
    worker: Worker | None = None,
) -> FastAPI:
    """The worker's FastAPI app. Its lifespan starts start-up in the background and stops all."""
    worker = worker or Worker(settings, lb_settings, runtime=runtime)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.begin()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(
        title="flashrt worker",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **_telemetry(worker.lb.telemetry),
    )
    app.state.worker = worker
    # Plain Starlette routes: they skip FastAPI's dependency solving (about 40 us a request).
    app.add_route("/ping", worker.ping, methods=["GET"], include_in_schema=False)
    app.add_route("/execute", worker.execute, methods=["POST"], include_in_schema=False)
    not_found = app.router.default

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        await worker.forward(scope, receive, send, not_found)

    app.router.default = fallback
    return app


class _ExecuteFirst:
    """``POST /execute`` straight to the worker, everything else (lifespan included) to the app.

    FastAPI's middleware stack and router are a measurable share of the worker's CPU per
    ``/execute``, and on that route they add nothing (its errors are its own answers, and the
    server answers 500 to an exception, as Starlette's error middleware would).
    """

    def __init__(self, app: FastAPI, worker: Worker) -> None:
        self.app = app
        self.worker = worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/execute"
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            await self.worker.serve_execute(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_served_app(worker: Worker) -> ASGIApp:
    """What the server runs: :func:`create_app`'s app, with ``POST /execute`` taken first
    unless FastAPI's telemetry is wanted (its spans come from the middleware skipped).

    An app to add middleware to is :func:`create_app`'s: this one's ``/execute`` skips it.
    """
    app = create_app(worker=worker)
    if _telemetry_wanted(worker.lb.telemetry):
        return app
    return _ExecuteFirst(app, worker)


def create_health_app(worker: Worker) -> FastAPI:
    """Only ``/ping``, for the ``PORT_HEALTH`` listener; it shares the worker's readiness."""
    app = FastAPI(
        docs_url=None, redoc_url=None, openapi_url=None, **_telemetry(worker.lb.telemetry)
    )
    app.add_route("/ping", worker.ping, methods=["GET"], include_in_schema=False)
    return app


def _telemetry(wanted: bool) -> dict[str, Any]:
    """FastAPI's ``telemetry`` argument, where it has one: everything off unless wanted (see
    ``FLASHRT_LB_TELEMETRY``)."""
    if _telemetry_wanted(wanted) or "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _telemetry_wanted(setting: bool) -> bool:
    return setting or os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true"
