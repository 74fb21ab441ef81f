"""The deployed app on disk: its directory and its manifest, read but never run.

A deployed worker (``FLASH_RESOURCE_NAME`` set) runs a ``flash build`` artifact, unpacked at
start-up by ``flashrt.artifact`` (or already in ``FLASHRT_APP_DIR`` with
``FLASH_DISABLE_UNPACK``). Its ``flash_manifest.json`` maps code-less requests to modules
(``flashrt.deployed``) and says how each resource was built (``max_concurrency``, which function
a generated handler serves). Nothing here imports the app: the generated QB handler is loaded by
:mod:`flashrt_core.handler_loading` and called by :mod:`flashrt_core.deployed_handler`, where
user code runs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import PluginContext

__all__ = [
    "MANIFEST_FILE",
    "DeployedAppUnavailable",
    "deployed_app_dir",
    "executor_app_dir",
    "load_manifest",
    "resource_max_concurrency",
]

MANIFEST_FILE = "flash_manifest.json"


class DeployedAppUnavailable(RuntimeError):
    """Deployed mode, but the app directory cannot be used; the message says why."""


def deployed_app_dir(context: PluginContext) -> Path | None:
    """The unpacked app's directory, ``None`` when this worker is not deployed.

    Raises :class:`DeployedAppUnavailable` with the reason when unpacking failed or has not run.
    The directory is the context's artifact outcome, recorded by ``flashrt.artifact`` (which,
    with ``FLASH_DISABLE_UNPACK``, records the app already unpacked in ``FLASHRT_APP_DIR``) or,
    in an executor, by its set-up.
    """
    if not context.settings.resource_name:
        return None
    outcome = context.artifact
    if outcome is None:
        raise DeployedAppUnavailable(
            "the artifact has not been unpacked (start-up did not run or was blocked)"
        )
    if outcome.status == "ready" and outcome.app_dir is not None:
        return Path(outcome.app_dir)
    reason = outcome.reason or f"unpacking is {outcome.status}"
    raise DeployedAppUnavailable(f"the artifact could not be unpacked: {reason}")


def executor_app_dir(context: PluginContext) -> str | None:
    """The app directory an executor process is handed: what start-up unpacked (or, with
    ``FLASH_DISABLE_UNPACK``, found already unpacked); ``None`` when there is none."""
    outcome = context.artifact
    if outcome is None or not outcome.ready or outcome.app_dir is None:
        return None
    return str(outcome.app_dir)


_manifest_cache: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}
_manifest_lock = threading.Lock()


def load_manifest(app_dir: Path) -> dict[str, Any]:
    """Read ``flash_manifest.json`` of the app (parsed once per file version). Blocking."""
    path = app_dir / MANIFEST_FILE
    try:
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        with _manifest_lock:
            cached = _manifest_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeployedAppUnavailable(
            f"the deployed app has no {MANIFEST_FILE} in {app_dir}"
        ) from None
    except (OSError, ValueError) as exc:
        raise DeployedAppUnavailable(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise DeployedAppUnavailable(f"{path} is not a JSON object")
    with _manifest_lock:
        _manifest_cache[path] = (key, data)
    return data


def resource_max_concurrency(app_dir: Path, resource: str) -> int | None:
    """The ``max_concurrency`` ``flash build`` wrote for ``resource`` (``Endpoint(...,
    max_concurrency=N)``); ``None`` when it wrote none (it leaves the default, 1, out). Blocking.

    Raises :class:`DeployedAppUnavailable` when the manifest cannot be read and ``ValueError``
    naming the problem when it has no such resource or the value is not a whole number >= 1.
    """
    resources = load_manifest(app_dir).get("resources")
    spec = resources.get(resource) if isinstance(resources, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"{MANIFEST_FILE} has no resource {resource!r}")
    value = spec.get("max_concurrency")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"resource {resource!r} of {MANIFEST_FILE} has max_concurrency {value!r}, "
            "not a whole number of at least 1"
        )
    return value
