"""Settings of the HTTP shell: where it listens, what `/execute` accepts, which app it serves."""

from __future__ import annotations

import dataclasses

from flashrt_core.settings import setting

__all__ = ["LBSettings"]


@dataclasses.dataclass(frozen=True)
class LBSettings:
    """The load-balancer shell's own settings; the runtime's are :class:`flashrt_core.Settings`."""

    port: int = setting("PORT", 80, "Port of the HTTP server (set by the platform).")
    port_health: int | None = setting(
        "PORT_HEALTH",
        None,
        "Port the platform polls `/ping` on; a second listener serves only `/ping` there when it"
        " differs from `PORT`.",
    )
    host: str = setting("FLASHRT_LB_HOST", "0.0.0.0", "Address both listeners bind to.")
    max_body_bytes: int | None = setting(
        "FLASHRT_LB_MAX_BODY_BYTES",
        None,
        "Largest `/execute` body read; larger ones get 413 while still arriving"
        " (default: `FLASHRT_MAX_REQUEST_BYTES`).",
    )
    token: str | None = setting(
        "FLASHRT_LB_TOKEN",
        None,
        "When set, `/execute` requires `Authorization: Bearer <token>` (401 otherwise).",
    )
    execute: bool | None = setting(
        "FLASHRT_LB_EXECUTE",
        None,
        "Force `/execute` on (true) or off (false); unset: on in live mode, and in deployed mode"
        " only when the manifest marks the resource `is_live_resource`.",
    )
    access_log: bool = setting(
        "FLASHRT_LB_ACCESS_LOG", False, "Log one line per HTTP request (uvicorn's access log)."
    )
    telemetry: bool = setting(
        "FLASHRT_LB_TELEMETRY",
        False,
        "FastAPI's own OpenTelemetry (spans, metrics, logs) for the worker's routes, where FastAPI"
        " has it (0.165+); also on with `FASTAPI_OTEL_AUTO_CONFIGURE=true`. Off by default: with"
        " no provider configured it records nothing, yet looks the three providers up on every"
        " request. A served app's own FastAPI telemetry is not affected.",
    )
    shutdown_timeout_s: float = setting(
        "FLASHRT_LB_SHUTDOWN_TIMEOUT_S",
        30.0,
        "How long a stopping worker waits for in-flight requests and the app's shutdown.",
    )
    # Legacy deployed apps (worker-flash 1.0 "mothership" form).
    is_mothership: bool = setting(
        "FLASH_IS_MOTHERSHIP",
        False,
        "Legacy deployed mode: serve the FastAPI app named by `FLASH_MAIN_FILE` and"
        " `FLASH_APP_VARIABLE`.",
    )
    main_file: str = setting(
        "FLASH_MAIN_FILE", "main.py", "Legacy deployed mode: the app's file, relative to the app."
    )
    app_variable: str = setting(
        "FLASH_APP_VARIABLE", "app", "Legacy deployed mode: the ASGI app's name in that file."
    )
