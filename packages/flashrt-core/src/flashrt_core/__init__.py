"""flashrt-core: run remote Python functions from runpod-flash requests, through plugins.

Importing the package is cheap: names below load their modules on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .context import PluginContext
    from .deps import DependencyPlan
    from .errors import StageError
    from .hookspecs import hookimpl, hookspec
    from .instances import InstanceRegistry
    from .invocation import Invocation
    from .plugins import get_plugin_manager
    from .protocol import FunctionRequest, FunctionResponse, decode_request, encode_response
    from .runtime import Runtime
    from .settings import Settings, load_settings

_EXPORTS = {
    "PluginContext": "context",
    "DependencyPlan": "deps",
    "StageError": "errors",
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "InstanceRegistry": "instances",
    "Invocation": "invocation",
    "get_plugin_manager": "plugins",
    "FunctionRequest": "protocol",
    "FunctionResponse": "protocol",
    "decode_request": "protocol",
    "encode_response": "protocol",
    "Runtime": "runtime",
    "Settings": "settings",
    "load_settings": "settings",
}

__all__ = [
    "DependencyPlan",
    "FunctionRequest",
    "FunctionResponse",
    "InstanceRegistry",
    "Invocation",
    "PluginContext",
    "Runtime",
    "Settings",
    "StageError",
    "__version__",
    "decode_request",
    "encode_response",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flashrt_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
