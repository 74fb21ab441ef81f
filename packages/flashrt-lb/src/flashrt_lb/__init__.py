"""flashrt-lb: the HTTP (load-balancer) worker shell on FastAPI and uvicorn.

``flashrt-lb`` serves ``/ping`` (honest readiness), ``/execute`` (FunctionRequest in,
FunctionResponse out) and, in deployed mode, the artifact's FastAPI app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .app import Worker, create_app, create_health_app
    from .settings import LBSettings

__all__ = ["LBSettings", "Worker", "__version__", "create_app", "create_health_app"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import FastAPI.
    if name in ("Worker", "create_app", "create_health_app"):
        from . import app

        return getattr(app, name)
    if name == "LBSettings":
        from .settings import LBSettings

        return LBSettings
    raise AttributeError(f"module 'flashrt_lb' has no attribute {name!r}")
