"""Built-in plugin ``flashrt.volume-cache``: package caches kept on the network volume.

One tarball per endpoint, ``<volume>/.cache/cache-<RUNPOD_ENDPOINT_ID>.tar`` (docs/contracts.md),
holds the local cache directory (``/root/.cache``: uv, pip, apt downloads) so a cold worker
installs from disk instead of the internet. This module is only the plugin's hooks: hydrate once
at start-up, persist (debounced, in the background) after installs that added files, flush a
pending persist at shutdown. The work lives below it, each module with one job:

* :mod:`.cache_sync`: :class:`VolumeCache`, hydration and debounced persisting;
* :mod:`.cache_tarball`: the tarball's merge with the volume's copy, LRU pruning, atomic rename;
* :mod:`.volume_lock`: the cross-worker lock file with stale-lock breaking.

A missing volume is a silent no-op; request handling never waits on any of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl
from .cache_sync import SyncResult, VolumeCache
from .volume_lock import VolumeLock
from .volume_settings import VolumeSettingsOwner

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from ..context import PluginContext
    from .volume_settings import VolumeSettings

__all__ = ["SyncResult", "VolumeCache", "VolumeCachePlugin", "VolumeLock"]


class VolumeCachePlugin(VolumeSettingsOwner):
    """``flashrt.volume-cache``; owns its :class:`VolumeCache` (``cache``, made on first use
    from ``volume``, the environment's settings when none are given)."""

    def __init__(self, volume: VolumeSettings | None = None) -> None:
        super().__init__(volume)
        self.cache: VolumeCache | None = None

    def _cache(self, context: PluginContext) -> VolumeCache:
        if self.cache is None:
            self.cache = VolumeCache(self.volume, context.settings.endpoint_id)
        return self.cache

    @hookimpl(trylast=True)
    def flashrt_sync_cache(
        self, phase: str, context: PluginContext
    ) -> Coroutine[Any, Any, None] | None:
        """``hydrate``: restore from the volume; ``persist``: debounced merge back to it."""
        if phase not in ("hydrate", "persist"):
            raise ValueError(
                f"unknown sync_cache phase {phase!r} (expected 'hydrate' or 'persist')"
            )
        cache = self._cache(context)
        if cache.unavailable() is not None:
            return None
        if phase == "hydrate":
            return _hydrate(cache, context)
        return cache.persist_soon(context.run_blocking)

    @hookimpl(trylast=True)
    def flashrt_shutdown(self, context: PluginContext) -> Coroutine[Any, Any, None] | None:
        """Flush a debounced persist that has not run yet, waiting briefly for the volume lock."""
        cache = self.cache
        if cache is None or not cache.pending:
            return None
        return cache.flush(
            context.run_blocking, lock_wait_s=min(10.0, cache.settings.cache_lock_wait_s)
        )


async def _hydrate(cache: VolumeCache, context: PluginContext) -> None:
    await context.run_blocking(cache.hydrate)
