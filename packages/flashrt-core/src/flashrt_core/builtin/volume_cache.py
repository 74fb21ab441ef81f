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

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from ..runtime import Runtime

__all__ = [
    "STATE_KEY",
    "SyncResult",
    "VolumeCache",
    "VolumeLock",
    "flashrt_shutdown",
    "flashrt_sync_cache",
]

#: ``runtime.state`` key of the runtime's :class:`VolumeCache`.
STATE_KEY = "flashrt.volume_cache"


def cache_for(runtime: Runtime) -> VolumeCache:
    """The runtime's :class:`VolumeCache`, made on first use from its volume settings."""
    cache = runtime.state.get(STATE_KEY)
    if not isinstance(cache, VolumeCache):
        from .volume_settings import volume_settings

        cache = VolumeCache(volume_settings(runtime), runtime.settings.endpoint_id)
        runtime.state[STATE_KEY] = cache
    return cache


async def _hydrate(cache: VolumeCache, runtime: Runtime) -> None:
    await runtime.run_blocking(cache.hydrate)


@hookimpl(trylast=True)
def flashrt_sync_cache(phase: str, runtime: Runtime) -> Coroutine[Any, Any, None] | None:
    """``hydrate``: restore from the volume; ``persist``: debounced merge back to it."""
    if phase not in ("hydrate", "persist"):
        raise ValueError(f"unknown sync_cache phase {phase!r} (expected 'hydrate' or 'persist')")
    cache = cache_for(runtime)
    if cache.unavailable() is not None:
        return None
    if phase == "hydrate":
        return _hydrate(cache, runtime)
    return cache.persist_soon(runtime.run_blocking)


@hookimpl(trylast=True)
def flashrt_shutdown(runtime: Runtime) -> Coroutine[Any, Any, None] | None:
    """Flush a debounced persist that has not run yet, waiting briefly for the volume lock."""
    cache = runtime.state.get(STATE_KEY)
    if not isinstance(cache, VolumeCache) or not cache.pending:
        return None
    return cache.flush(
        runtime.run_blocking, lock_wait_s=min(10.0, cache.settings.cache_lock_wait_s)
    )
