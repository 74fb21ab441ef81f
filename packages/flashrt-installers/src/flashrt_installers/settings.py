"""Settings of the installers: each installer plugin is made with its own, or reads them from
the environment (``flashrt_core.load_settings``) on first use."""

from __future__ import annotations

import dataclasses

from flashrt_core.settings import setting

__all__ = ["InstallerSettings"]


@dataclasses.dataclass(frozen=True)
class InstallerSettings:
    """Limits and tool choices of the Python and system installers."""

    install_timeout_s: float = setting(
        "FLASHRT_INSTALL_TIMEOUT_S",
        900.0,
        "Time limit for one installer command (uv, pip, apt-get, nala); the whole process group "
        "is killed past it. Also the longest wait for another executor's install into the same "
        "environment.",
    )
    output_tail_bytes: int = setting(
        "FLASHRT_INSTALL_OUTPUT_TAIL_BYTES",
        8192,
        "How much of an installer's output (its end) is kept and quoted in an install error.",
    )
    retry_delay_s: float = setting(
        "FLASHRT_INSTALL_RETRY_DELAY_S",
        2.0,
        "Pause before the single retry of an install that failed on a transient network error.",
    )
    python_installer: str = setting(
        "FLASHRT_PYTHON_INSTALLER",
        "auto",
        "`auto` (uv when found and `accelerate_downloads`, else pip), `uv` or `pip`.",
    )
    uv_path: str | None = setting(
        "FLASHRT_UV_PATH",
        None,
        "The uv binary to use (default: the one the `uv` package installed with flashrt ships, "
        "then `uv` on PATH).",
    )
    break_system_packages: bool = setting(
        "FLASHRT_BREAK_SYSTEM_PACKAGES",
        True,
        "Install into an externally managed (PEP 668) interpreter when the worker runs on one.",
    )
    install_build_essential: bool = setting(
        "FLASHRT_INSTALL_BUILD_ESSENTIAL",
        True,
        "Install `build-essential` once (as root) and retry when a Python build lacks a compiler.",
    )
    apt_nala_min_mb: float = setting(
        "FLASHRT_APT_NALA_MIN_MB",
        50.0,
        "With `accelerate_downloads`, use nala (when present) if a requested Debian package's "
        "download is at least this many MB.",
    )
    apt_lock_timeout_s: int = setting(
        "FLASHRT_APT_LOCK_TIMEOUT_S",
        120,
        "How long apt-get waits for a dpkg lock held by another process.",
    )
    apt_update_min_interval_s: float = setting(
        "FLASHRT_APT_UPDATE_MIN_INTERVAL_S",
        3600.0,
        "After the first `apt-get update`, another runs only when an install fails on missing or "
        "stale package lists and the last one is at least this old.",
    )
    dpkg_status_path: str = setting(
        "FLASHRT_DPKG_STATUS",
        "/var/lib/dpkg/status",
        "dpkg's status database, read (not executed) to skip installed Debian packages.",
    )
