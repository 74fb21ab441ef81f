"""Importing the runpod SDK, minus the one second it spends probing the CPU's clock.

``import runpod.serverless`` imports ``rp_debugger``, which calls ``cpuinfo.get_cpu_info()`` at
import time for a single value, ``brand_raw`` (shown only in ``--rp_debugger`` output). py-cpuinfo
answers by spawning a Python subprocess that, among other probes, sleeps one second to measure
the clock rate: about 1.1 s of the SDK's 1.3 s import. On Linux, py-cpuinfo takes ``brand_raw``
from the ``model name`` line of ``/proc/cpuinfo`` (its first source; the later ones only fill
missing fields), so while the SDK is imported we answer the query from that line: the same
value, without the probe. Afterwards ``cpuinfo.get_cpu_info`` is the original again for everyone
else, and without a ``model name`` line the original runs.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["cpu_brand", "import_serverless", "set_sdk_log_level"]

_PROC_CPUINFO = Path("/proc/cpuinfo")


def cpu_brand(path: Path = _PROC_CPUINFO) -> str | None:
    """``model name`` from ``/proc/cpuinfo``, which is what py-cpuinfo reports as ``brand_raw``."""
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def import_serverless(fast: bool = True) -> ModuleType:
    """Import and return ``runpod.serverless``; ``fast`` skips py-cpuinfo's probe (see above)."""
    if not fast or "runpod.serverless.utils.rp_debugger" in sys.modules:
        return importlib.import_module("runpod.serverless")
    brand = cpu_brand()
    try:
        import cpuinfo  # type: ignore[import-untyped]
    except ImportError:
        return importlib.import_module("runpod.serverless")
    original = cpuinfo.get_cpu_info
    if brand is not None:

        def brand_only() -> dict[str, Any]:
            return {"brand_raw": brand}

        cpuinfo.get_cpu_info = brand_only
    try:
        return importlib.import_module("runpod.serverless")
    finally:
        cpuinfo.get_cpu_info = original


def set_sdk_log_level(level: str) -> None:
    """Set the runpod SDK logger's level; an unknown name is reported and the SDK's kept."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    logger = RunPodLogger()
    if str(logger.level).upper() == level.upper():
        return
    try:
        logger.set_level(level)
    except ValueError as exc:
        logger.warn(f"flashrt-qb: ignoring the log level {level!r}: {exc}")
