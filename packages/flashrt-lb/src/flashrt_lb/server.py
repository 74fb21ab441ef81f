"""Serving: uvicorn on ``PORT``, plus a ``/ping``-only listener on ``PORT_HEALTH`` when it differs.

Both servers run in one process and one event loop, so they share the worker's readiness. Only
the main server handles SIGTERM/SIGINT; the health listener stops when it does. After a graceful
stop the process exits 0 (uvicorn alone would re-raise the signal and die of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal

import uvicorn

from .app import create_health_app, create_served_app

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

    from .worker import Worker

__all__ = ["run", "serve"]


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _MainServer(uvicorn.Server):
    """Stops gracefully on SIGINT/SIGTERM, then returns instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _HealthServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(
    app: Any, worker: Worker, port: int, *, lifespan: Literal["on", "off"]
) -> uvicorn.Config:
    lb = worker.lb
    return uvicorn.Config(
        app,
        host=lb.host,
        port=port,
        lifespan=lifespan,
        log_config=None,
        access_log=lb.access_log,
        server_header=False,
        timeout_graceful_shutdown=int(lb.shutdown_timeout_s) or None,
    )


async def serve(worker: Worker) -> None:
    """Serve until SIGTERM/SIGINT; start-up runs in the background meanwhile."""
    lb = worker.lb
    main = _MainServer(_config(create_served_app(worker), worker, lb.port, lifespan="on"))
    health: uvicorn.Server | None = None
    if lb.port_health is not None and lb.port_health != lb.port:
        health = _HealthServer(
            _config(create_health_app(worker), worker, lb.port_health, lifespan="off")
        )
    if health is None:
        await main.serve()
        return
    health_task = asyncio.create_task(health.serve(), name="flashrt-lb-health")
    try:
        await main.serve()
    finally:
        health.should_exit = True
        await health_task


def run(worker: Worker) -> None:
    """Run :func:`serve` on uvloop when it is installed, else on the default asyncio loop."""
    _run(serve(worker))


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:  # pragma: no cover - Python 3.10
        uvloop.install()
        asyncio.run(coro)
