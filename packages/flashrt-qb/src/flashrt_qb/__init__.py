"""flashrt-qb: the queue worker shell, the runpod SDK under our job loop over one ``Runtime``.

Importing the package is cheap: the SDK is imported only when the worker serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .settings import QBSettings
    from .worker import QueueWorker, response_output

__all__ = ["QBSettings", "QueueWorker", "__version__", "response_output"]


def __getattr__(name: str) -> Any:
    if name == "QBSettings":
        from .settings import QBSettings

        return QBSettings
    if name in ("QueueWorker", "response_output"):
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'flashrt_qb' has no attribute {name!r}")
