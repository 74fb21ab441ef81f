"""Settings of the deployed-mode built-ins: volume cache, manifest reconciliation, artifact.

Read with ``load_settings(VolumeSettings)``; every path and bound is settable so tests (and odd
platforms) can point them at temporary directories and small numbers. Each of those plugins
takes its own (``VolumeCachePlugin(volume=...)`` and so on; from the environment when none is
given), so a test or an embedder registers an instance made with its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..settings import load_settings, setting

__all__ = ["DEFAULT_API_BASE_URL", "VolumeSettings", "VolumeSettingsOwner"]

DEFAULT_API_BASE_URL = "https://api.runpod.io"

_GIB = 1024 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class VolumeSettings:
    """Where the network volume, caches and unpacked app live, and how long to wait for them."""

    # Network-volume cache
    volume_dir: Path = setting(
        "FLASHRT_VOLUME_DIR",
        Path("/runpod-volume"),
        "Network volume shared by the endpoint's workers; absent means no volume cache.",
    )
    cache_dir: Path = setting(
        "FLASHRT_CACHE_DIR",
        Path("/root/.cache"),
        "Local package caches (uv, pip, apt) hydrated from and persisted to the volume.",
    )
    disable_volume_cache: bool = setting(
        "FLASHRT_DISABLE_VOLUME_CACHE", False, "Never read or write the volume cache tarball."
    )
    cache_max_bytes: int = setting(
        "FLASHRT_CACHE_MAX_BYTES",
        10 * _GIB,
        "Size cap of the volume cache tarball; least recently used entries are pruned.",
    )
    cache_max_members: int = setting(
        "FLASHRT_CACHE_MAX_MEMBERS",
        500_000,
        "Most files a cache tarball may hold (a larger one is refused at hydration).",
    )
    cache_entry_depth: int = setting(
        "FLASHRT_CACHE_ENTRY_DEPTH",
        3,
        "Path depth of one pruning unit (uv/archive-v0/<hash> is kept or dropped whole).",
    )
    cache_lock_stale_s: float = setting(
        "FLASHRT_CACHE_LOCK_STALE_S",
        600.0,
        "Age after which another worker's volume lock is considered abandoned and broken.",
    )
    cache_lock_wait_s: float = setting(
        "FLASHRT_CACHE_LOCK_WAIT_S",
        120.0,
        "How long a persist waits for another worker's lock before trying again later.",
    )
    cache_persist_debounce_s: float = setting(
        "FLASHRT_CACHE_PERSIST_DEBOUNCE_S",
        10.0,
        "Quiet time after an install before new cache files are persisted (bursts coalesce).",
    )
    # Manifest reconciliation
    environment_id: str | None = setting(
        "FLASH_ENVIRONMENT_ID",
        None,
        "Deployed mode: the flash environment whose manifest to track.",
    )
    api_base_url: str = setting(
        "RUNPOD_API_BASE_URL", DEFAULT_API_BASE_URL, "RunPod control plane (as the flash client)."
    )
    state_manager_url: str | None = setting(
        "FLASHRT_STATE_MANAGER_URL",
        None,
        "State Manager GraphQL URL (default: $RUNPOD_API_BASE_URL/graphql, "
        "https://api.runpod.io/graphql).",
    )
    manifest_ttl_s: float = setting(
        "FLASHRT_MANIFEST_TTL_S", 300.0, "Age after which flash_manifest.json is refreshed."
    )
    manifest_wait_s: float = setting(
        "FLASHRT_MANIFEST_WAIT_S",
        1.0,
        "Longest a caller waits for a refresh before getting the manifest it already has.",
    )
    manifest_timeout_s: float = setting(
        "FLASHRT_MANIFEST_TIMEOUT_S", 10.0, "Timeout of one State Manager HTTP request."
    )
    manifest_backoff_s: float = setting(
        "FLASHRT_MANIFEST_BACKOFF_S",
        5.0,
        "Pause after a failed refresh before the next try; doubles per failure.",
    )
    manifest_max_backoff_s: float = setting(
        "FLASHRT_MANIFEST_MAX_BACKOFF_S", 300.0, "Upper bound of the refresh back-off."
    )
    # Artifact
    app_dir: Path = setting(
        "FLASHRT_APP_DIR",
        Path("/root/.flashrt/app"),
        "Deployed mode: where the artifact is unpacked (kept apart from flashrt's own code).",
    )
    artifact_wait_s: float = setting(
        "FLASHRT_ARTIFACT_WAIT_S",
        60.0,
        "Total time to keep retrying while the artifact has not appeared (or is still growing).",
    )
    artifact_backoff_s: float = setting(
        "FLASHRT_ARTIFACT_BACKOFF_S", 0.5, "First pause between unpack attempts; doubles."
    )
    artifact_max_backoff_s: float = setting(
        "FLASHRT_ARTIFACT_MAX_BACKOFF_S", 5.0, "Longest pause between unpack attempts."
    )
    artifact_max_bytes: int = setting(
        "FLASHRT_ARTIFACT_MAX_BYTES", 8 * _GIB, "Largest total unpacked size of an artifact."
    )
    artifact_max_members: int = setting(
        "FLASHRT_ARTIFACT_MAX_MEMBERS", 200_000, "Most members an artifact may hold."
    )

    @property
    def graphql_url(self) -> str:
        """The State Manager endpoint: the explicit URL, else the control plane's ``/graphql``."""
        if self.state_manager_url:
            return self.state_manager_url
        return self.api_base_url.rstrip("/") + "/graphql"


class VolumeSettingsOwner:
    """Base of the deployed-mode plugins: the :class:`VolumeSettings` they were made with, or
    the environment's, read on first use (a plugin is made when its manager is, before any
    hook needs them)."""

    def __init__(self, volume: VolumeSettings | None = None) -> None:
        self._volume = volume

    @property
    def volume(self) -> VolumeSettings:
        if self._volume is None:
            self._volume = load_settings(VolumeSettings)
        return self._volume
