"""Settings of the queue worker shell, read once with ``flashrt_core.load_settings``."""

from __future__ import annotations

import dataclasses

from flashrt_core.settings import setting

__all__ = ["QBSettings"]


@dataclasses.dataclass(frozen=True)
class QBSettings:
    """How many jobs run at once, how many wait in hand, how long start-up and a take may take."""

    concurrency: int | None = setting(
        "FLASHRT_QB_CONCURRENCY",
        None,
        "Jobs the queue worker runs at once (at least 1). Unset: a deployed worker runs its "
        "resource's `max_concurrency` from flash_manifest.json (`Endpoint(max_concurrency=N)`), "
        "a live one 1; set, it overrides the manifest.",
    )
    prefetch: int = setting(
        "FLASHRT_QB_PREFETCH",
        0,
        "Jobs taken from the queue beyond those that can run now (opt-in): a held job waits "
        "here for a slot while another worker of the endpoint may sit idle.",
    )
    take_timeout_s: float = setting(
        "FLASHRT_QB_TAKE_TIMEOUT_S",
        90.0,
        "Longest one job-take request may stay unanswered before the loop asks again (the "
        "SDK's own bound).",
    )
    startup_timeout_s: float = setting(
        "FLASHRT_QB_STARTUP_TIMEOUT_S",
        600.0,
        "Longest a job waits for start-up (plugins, artifact, deployed handler import) before "
        "it fails with the reason; later jobs are served once start-up finishes.",
    )
    fast_sdk_import: bool = setting(
        "FLASHRT_QB_FAST_SDK_IMPORT",
        True,
        "While the runpod SDK is imported, answer its one CPU-brand query from /proc/cpuinfo "
        "instead of py-cpuinfo's 1 s frequency probe (a subprocess that sleeps 1 s).",
    )

    sdk_log_level: str | None = setting(
        "RUNPOD_LOG_LEVEL",
        None,
        "Level of the runpod SDK's own log (NOTSET, TRACE, DEBUG, INFO, WARN, ERROR); unset: "
        "RUNPOD_DEBUG_LEVEL, else INFO (the SDK alone defaults to DEBUG, a line per poll).",
    )
    sdk_debug_level: str | None = setting(
        "RUNPOD_DEBUG_LEVEL", None, "The SDK's older name for RUNPOD_LOG_LEVEL."
    )

    @property
    def sdk_level(self) -> str:
        """The runpod SDK's log level in force."""
        return (self.sdk_log_level or self.sdk_debug_level or "INFO").upper()

    @property
    def slots(self) -> int:
        """Jobs run at once, as far as the settings say (a deployed worker may take its
        manifest's ``max_concurrency`` instead when :attr:`concurrency` is unset)."""
        return 1 if self.concurrency is None else max(1, self.concurrency)

    @property
    def extra(self) -> int:
        """Jobs held beyond the running ones."""
        return max(0, self.prefetch)
