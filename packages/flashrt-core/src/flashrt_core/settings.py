"""Typed settings read once from the environment.

Each package declares its own dataclass of settings with :func:`setting`; :func:`load_settings`
fills it from ``os.environ`` (or a mapping the caller passes, which is how tests configure a
worker without touching the process environment). No other module reads ``os.environ`` itself.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "Settings",
    "SettingsError",
    "describe_settings",
    "load_settings",
    "setting",
]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def setting(env: str, default: Any, doc: str) -> Any:
    """Declare a dataclass field bound to environment variable ``env``, documented by ``doc``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata={"env": env, "doc": doc})


def _parse(env: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(env, raw, inner[0])
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{env}={raw!r}: expected a boolean (1/0, true/false, yes/no)")
    if kind in (int, float):
        try:
            value = kind(raw.strip())
        except ValueError:
            raise SettingsError(f"{env}={raw!r}: expected a number") from None
        if value < 0:
            raise SettingsError(f"{env}={raw!r}: must not be negative")
        return value
    if kind is Path:
        return Path(raw)
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from the environment; ``overrides`` win over both environment and defaults."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in overrides:
            values[field.name] = overrides[field.name]
            continue
        name = field.metadata.get("env")
        if name and name in env:
            values[field.name] = _parse(name, env[name], hints[field.name])
    return cls(**values)


def describe_settings(cls: type[Any]) -> Iterator[tuple[str, str, str]]:
    """(variable, default, doc) rows: the README's settings table is checked against these."""
    for field in dataclasses.fields(cls):
        if "env" in field.metadata:
            default = field.default
            if isinstance(default, tuple):
                shown = ",".join(default)
            elif default is None:
                shown = ""
            else:
                shown = str(default)
            yield field.metadata["env"], shown, field.metadata["doc"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings of the core runtime and the platform facts every shell shares."""

    # Execution
    timeout_s: float = setting(
        "FLASHRT_TIMEOUT_S", 600.0, "Default time limit for one request's code, in seconds."
    )
    max_timeout_s: float = setting(
        "FLASHRT_MAX_TIMEOUT_S", 3600.0, "Upper bound on a request's own `timeout_s` field."
    )
    max_threads: int = setting(
        "FLASHRT_MAX_THREADS", 64, "Worker threads for sync user code and blocking work."
    )
    max_request_bytes: int = setting(
        "FLASHRT_MAX_REQUEST_BYTES",
        128 * 1024 * 1024,
        "Largest encoded request accepted (arguments, code and modules together).",
    )
    max_output_bytes: int = setting(
        "FLASHRT_MAX_OUTPUT_BYTES",
        1024 * 1024,
        "Captured stdout/stderr/log kept per request; the rest is cut with a marker.",
    )
    max_modules_bytes: int = setting(
        "FLASHRT_MAX_MODULES_BYTES",
        16 * 1024 * 1024,
        "Largest total size of a request's `modules` sources.",
    )
    max_instances: int = setting(
        "FLASHRT_MAX_INSTANCES", 128, "Class instances kept alive; least recently used go first."
    )
    instance_ttl_s: float = setting(
        "FLASHRT_INSTANCE_TTL_S", 3600.0, "Idle time after which a class instance is dropped."
    )
    log_level: str = setting("FLASHRT_LOG_LEVEL", "INFO", "Level of the worker's own logging.")
    tmp_dir: Path | None = setting(
        "FLASHRT_TMP_DIR",
        None,
        "Where per-request module directories are created (default: the system temp dir).",
    )
    # Plugins
    disable_plugin_autoload: bool = setting(
        "FLASHRT_DISABLE_PLUGIN_AUTOLOAD",
        False,
        "Do not load plugins from the `flashrt` entry-point group.",
    )
    blocked_plugins: tuple[str, ...] = setting(
        "FLASHRT_BLOCKED_PLUGINS",
        (),
        "Comma-separated plugin names (entry-point or built-in) never registered.",
    )
    trace_hooks: bool = setting(
        "FLASHRT_TRACE_HOOKS", False, "Trace every hook call and result to stderr."
    )
    # Platform (names fixed by RunPod and runpod-flash)
    endpoint_id: str | None = setting(
        "RUNPOD_ENDPOINT_ID", None, "The endpoint this worker serves (names its volume cache)."
    )
    api_key: str | None = setting(
        "RUNPOD_API_KEY", None, "Key for the State Manager (manifest refresh)."
    )
    resource_name: str | None = setting(
        "FLASH_RESOURCE_NAME", None, "Deployed mode: the manifest resource this worker serves."
    )
    artifact_path: Path = setting(
        "FLASH_BUILD_ARTIFACT_PATH",
        Path("/root/.runpod/artifact.tar.gz"),
        "Deployed mode: the `flash build` artifact to unpack.",
    )
    disable_unpack: bool = setting(
        "FLASH_DISABLE_UNPACK", False, "Deployed mode: serve an already-unpacked app."
    )
