"""Deployed mode's generated QB handler: it runs where user code runs, so it lives in core.

Re-exported here for the shell and its tests; see :mod:`flashrt_core.deployed_handler` and
:mod:`flashrt_core.handler_loading`.
"""

from __future__ import annotations

from flashrt_core.deployed_handler import DeployedHandler, is_function_request
from flashrt_core.handler_loading import DeployedHandlerError, handler_step, load_handler

__all__ = [
    "DeployedHandler",
    "DeployedHandlerError",
    "handler_step",
    "is_function_request",
    "load_handler",
]
