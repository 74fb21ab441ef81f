"""Typed settings read once from the environment.

Each package declares its own dataclass of settings with :func:`setting`; :func:`load_settings`
fills it from ``os.environ`` (or a mapping the caller passes, which is how tests configure a
worker without touching the process environment). No other module reads ``os.environ`` itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "Settings",
    "SettingsError",
    "check_isolation",
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
    # No limit of our own by default: the platform enforces the endpoint's execution timeout,
    # and a fine-tuning run may rightly take hours.
    timeout_s: float | None = setting(
        "FLASHRT_TIMEOUT_S",
        None,
        "Time limit for one request's code, in seconds, when the request sets none of its own "
        "(`timeout_s`); past it the request fails and its code is stopped. Unset or 0: no limit "
        "of flashrt's own (the platform's execution timeout still applies).",
    )
    max_timeout_s: float | None = setting(
        "FLASHRT_MAX_TIMEOUT_S",
        None,
        "Upper bound on a request's own `timeout_s` field (never on `FLASHRT_TIMEOUT_S`). "
        "Unset or 0: a request's own limit is taken as given.",
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
    # Isolation: user code in a supervised executor process
    isolation: str = setting(
        "FLASHRT_ISOLATION",
        "process",
        "`process`: user code runs in a supervised executor process that is replaced when it "
        "dies or is poisoned; `none`: in the worker's own process.",
    )
    retry_on_executor_death: bool = setting(
        "FLASHRT_RETRY_ON_EXECUTOR_DEATH",
        True,
        "Retry once, on a fresh executor, the requests in flight when the executor died.",
    )
    hard_timeout_grace_s: float = setting(
        "FLASHRT_HARD_TIMEOUT_GRACE_S",
        5.0,
        "After a call's time limit, how long its code may keep running before the executor is "
        "recycled to stop it.",
    )
    executor_start_timeout_s: float = setting(
        "FLASHRT_EXECUTOR_START_TIMEOUT_S", 60.0, "Longest wait for a fresh executor to start."
    )
    executor_stop_grace_s: float = setting(
        "FLASHRT_EXECUTOR_STOP_GRACE_S",
        5.0,
        "On shutdown, time between SIGTERM and SIGKILL of the executor.",
    )
    executors: str = setting(
        "FLASHRT_EXECUTORS",
        "1",
        "How many executor processes serve requests at once: a whole number, or `auto` (the "
        "CPUs the worker may use). More lets CPU-bound sync code use more cores; each holds its "
        "own imports and class instances (and, on a GPU, its own CUDA context and models).",
    )
    spare: bool = setting(
        "FLASHRT_SPARE",
        True,
        "Keep one spare executor started and idle, so a recycle hands the next request to it "
        "at once. Costs one more executor's memory (the modules it imported).",
    )
    zygote: bool = setting(
        "FLASHRT_ZYGOTE",
        True,
        "Fork executors from a zygote: an idle process with the executor's imports done (and "
        "the user's, carried over), so a new one is ready in milliseconds instead of a fresh "
        "interpreter's quarter second. Costs one idle process's memory.",
    )
    carry_imports: bool = setting(
        "FLASHRT_CARRY_IMPORTS",
        True,
        "The executor reports the top-level modules user code imported (from site-packages, the "
        "standard library or the app), so the next executor can import them before its first "
        "request.",
    )
    # Live output
    echo: bool = setting(
        "FLASHRT_ECHO",
        True,
        "Copy each line a request's code writes to the worker's stdout/stderr as it is written.",
    )
    echo_max_bytes: int = setting(
        "FLASHRT_ECHO_MAX_BYTES",
        4 * 1024 * 1024,
        "Live echo per request; past it the echo is cut (once, with a notice).",
    )
    timing_log: bool = setting(
        "FLASHRT_TIMING_LOG",
        True,
        "One INFO line per request with its id: outcome, total, and the stages that took time.",
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
    # A model download and load can take many minutes; a start-up that never finishes must
    # still be reported rather than leave the worker "starting" forever.
    startup_timeout_s: float = setting(
        "FLASHRT_STARTUP_TIMEOUT_S",
        1800.0,
        "Deployed mode: longest the app's start-up may take (importing the QB handler, or the LB"
        " app and its lifespan start-up). Past it `/ping` answers 503 and jobs fail, naming what"
        " was still starting; the worker keeps running. 0: no limit.",
    )
    startup_progress_s: float = setting(
        "FLASHRT_STARTUP_PROGRESS_S",
        30.0,
        "Deployed mode: while the app starts, a log line this often says what is still starting"
        " and for how long. 0: none.",
    )

    def time_limit(self, own: object = None) -> float | None:
        """A request's time limit in seconds, ``None`` for none of ours.

        ``own`` is the request's ``timeout_s`` field: a positive number is taken, bounded by
        ``max_timeout_s``; otherwise the operator's ``timeout_s`` applies, unbounded (the cap
        is for what callers ask, not for what the operator set).
        """
        if isinstance(own, (int, float)) and not isinstance(own, bool) and own > 0:
            bound = self.max_timeout_s
            limit = float(min(own, bound) if bound else own)
        else:
            limit = self.timeout_s or 0.0
        return limit if 0 < limit < math.inf else None


def check_isolation(settings: Settings) -> None:
    """Refuse what a ``Runtime`` cannot run: an unknown ``FLASHRT_ISOLATION``, or (isolated) a
    ``FLASHRT_EXECUTORS`` that is no count."""
    if settings.isolation not in ("process", "none"):
        raise SettingsError(
            f"FLASHRT_ISOLATION={settings.isolation!r}: expected 'process' or 'none'"
        )
    if settings.isolation == "process":
        try:
            executor_count(settings.executors)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None


def executor_count(setting: str) -> int:
    """``FLASHRT_EXECUTORS``: a whole number from 1, or ``auto`` (the CPUs this process may
    use). Raises :class:`ValueError` naming the setting."""
    if setting.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        size = int(setting)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"FLASHRT_EXECUTORS={setting!r}: expected a whole number >= 1 or 'auto'")
    return size


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """Plain values of a settings dataclass (paths as strings), to hand to another process."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        out[field.name] = str(value) if isinstance(value, Path) else value
    return out


def settings_from_dict(cls: type[T], values: Mapping[str, Any], **overrides: Any) -> T:
    """The inverse of :func:`settings_to_dict`."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in values:
            continue
        value = values[field.name]
        kind = hints[field.name]
        if value is not None and Path in (kind, *typing.get_args(kind)):
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        fields[field.name] = value
    fields.update(overrides)
    return cls(**fields)
