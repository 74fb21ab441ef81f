"""Deployed mode's generated QB handler: it runs where user code runs, so it lives in core.

Re-exported here for the shell and its tests; see :mod:`flashrt_core.deployment`.
"""

from __future__ import annotations

from flashrt_core.deployment import (
    DeployedHandler,
    DeployedHandlerError,
    handler_step,
    is_function_request,
    load_handler,
)

__all__ = [
    "DeployedHandler",
    "DeployedHandlerError",
    "handler_step",
    "is_function_request",
    "load_handler",
]
