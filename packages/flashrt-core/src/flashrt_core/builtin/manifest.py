"""Built-in plugin ``flashrt.manifest``: the local ``flash_manifest.json`` kept up to date.

A deployed app's manifest (which resource serves which function, and the endpoints' URLs) is
kept by RunPod's State Manager. When the local copy is older than ``FLASHRT_MANIFEST_TTL_S`` it is
fetched again over GraphQL with ``RUNPOD_API_KEY`` - the flash environment's ``activeBuildId``,
then that build's ``manifest``, the same two queries the flash client makes - and written
atomically. Guarantees:

* single flight: one refresh at a time per file, however many callers ask;
* failures are remembered with exponential back-off, so a dead service is not hammered;
* a caller waits at most ``FLASHRT_MANIFEST_WAIT_S`` and otherwise gets the manifest it already
  has; the refresh runs in its own thread with an HTTP timeout and finishes on its own.

Only the standard library is used (urllib in a thread), keeping flashrt-core's dependencies small.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl
from .volume_settings import VolumeSettingsOwner

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping

    from ..context import PluginContext
    from .volume_settings import VolumeSettings

__all__ = ["ManifestPlugin", "ManifestReconciler", "StateManagerError", "fetch_manifest"]

logger = logging.getLogger("flashrt.manifest")

_ENVIRONMENT_QUERY = """
query getFlashEnvironment($flashEnvironmentId: String!) {
  flashEnvironment(flashEnvironmentId: $flashEnvironmentId) { id activeBuildId }
}
"""

_BUILD_QUERY = """
query getFlashBuild($input: String!) {
  flashBuild(flashBuildId: $input) { id manifest }
}
"""


class StateManagerError(RuntimeError):
    """The State Manager could not provide the manifest; the message says why (no secrets)."""


def _graphql(
    url: str, api_key: str, query: str, variables: dict[str, Any], timeout: float
) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {api_key}",
            "User-Agent": "flashrt",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise StateManagerError(f"State Manager answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StateManagerError(f"State Manager unreachable at {url}: {reason}") from None
    try:
        payload = json.loads(raw)
    except ValueError:
        raise StateManagerError("State Manager answered with something that is not JSON") from None
    if not isinstance(payload, dict):
        raise StateManagerError("State Manager answered with a JSON value that is not an object")
    errors = payload.get("errors")
    if errors:
        messages = "; ".join(
            str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors
        )
        raise StateManagerError(f"State Manager GraphQL errors: {messages}")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise StateManagerError("State Manager answer has no 'data' object")
    return data


def fetch_manifest(url: str, api_key: str, environment_id: str, timeout: float) -> dict[str, Any]:
    """Environment -> active build -> manifest, as a dict; raises :class:`StateManagerError`."""
    data = _graphql(
        url, api_key, _ENVIRONMENT_QUERY, {"flashEnvironmentId": environment_id}, timeout
    )
    environment = data.get("flashEnvironment")
    build_id = environment.get("activeBuildId") if isinstance(environment, dict) else None
    if not build_id:
        raise StateManagerError(f"flash environment {environment_id!r} has no active build")
    data = _graphql(url, api_key, _BUILD_QUERY, {"input": str(build_id)}, timeout)
    build = data.get("flashBuild")
    manifest = build.get("manifest") if isinstance(build, dict) else None
    if isinstance(manifest, str):
        try:
            manifest = json.loads(manifest)
        except ValueError:
            raise StateManagerError(
                f"build {build_id!r} holds a manifest that is not JSON"
            ) from None
    if not isinstance(manifest, dict) or not manifest:
        raise StateManagerError(f"build {build_id!r} has no manifest")
    return manifest


class ManifestReconciler:
    """Serves one manifest file, refreshing it from the State Manager in the background."""

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        wait_s: float,
        backoff_s: float,
        max_backoff_s: float,
        fetch: Callable[[], dict[str, Any]] | None,
    ) -> None:
        """``fetch`` returns a fresh manifest or raises; ``None`` means refreshing is off."""
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max(max_backoff_s, backoff_s)
        self._fetch = fetch
        self._lock = threading.Lock()
        self._inflight: concurrent.futures.Future[None] | None = None
        self._failures = 0
        self._retry_at = 0.0  # time.monotonic() before which no refresh is tried
        self.last_error: str | None = None
        self.refreshes = 0  # successful refreshes, for diagnostics and tests
        # (mtime_ns, size) -> parsed content of the local file
        self._parsed: tuple[tuple[int, int], dict[str, Any] | None] | None = None
        # the latest refresh, kept in memory in case the file could not be written
        self._memory: tuple[float, dict[str, Any]] | None = None

    @classmethod
    def from_settings(
        cls, path: Path, settings: VolumeSettings, api_key: str | None
    ) -> ManifestReconciler:
        fetch: Callable[[], dict[str, Any]] | None = None
        environment_id = settings.environment_id
        if api_key and environment_id:
            url, timeout = settings.graphql_url, settings.manifest_timeout_s

            def fetch() -> dict[str, Any]:
                return fetch_manifest(url, api_key, environment_id, timeout)

        return cls(
            path,
            ttl_s=settings.manifest_ttl_s,
            wait_s=settings.manifest_wait_s,
            backoff_s=settings.manifest_backoff_s,
            max_backoff_s=settings.manifest_max_backoff_s,
            fetch=fetch,
        )

    # --- reading -------------------------------------------------------------------------

    def _file_state(self) -> tuple[float, dict[str, Any] | None] | None:
        """(mtime, parsed content) of the local file, re-read only when it changed."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if self._parsed is None or self._parsed[0] != key:
            content: dict[str, Any] | None
            try:
                loaded = json.loads(self.path.read_bytes())
                content = loaded if isinstance(loaded, dict) else None
            except (OSError, ValueError):
                content = None
            if content is None:
                logger.warning("%s is not a JSON object; ignoring it", self.path)
            self._parsed = (key, content)
        return st.st_mtime, self._parsed[1]

    def current(self) -> dict[str, Any] | None:
        """The newest manifest known: the local file or, if newer, the last refresh in memory."""
        file_state = self._file_state()
        memory = self._memory
        if memory is not None and (file_state is None or memory[0] > file_state[0]):
            return memory[1]
        return None if file_state is None else file_state[1]

    def age_s(self) -> float | None:
        """Seconds since the newest known manifest was written or fetched (``None``: none)."""
        stamps = []
        file_state = self._file_state()
        if file_state is not None and file_state[1] is not None:
            stamps.append(file_state[0])
        if self._memory is not None:
            stamps.append(self._memory[0])
        return time.time() - max(stamps) if stamps else None

    def stale(self) -> bool:
        age = self.age_s()
        return age is None or age >= self.ttl_s

    # --- refreshing ----------------------------------------------------------------------

    def refresh_in_background(self) -> concurrent.futures.Future[None] | None:
        """Start a refresh unless one is running, refreshing is off, or back-off holds.

        Returns the in-flight refresh (possibly one another caller started), or ``None``.
        """
        if self._fetch is None:
            return None
        with self._lock:
            if self._inflight is not None and not self._inflight.done():
                return self._inflight
            if time.monotonic() < self._retry_at:
                return None
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            self._inflight = future
        thread = threading.Thread(
            target=self._refresh, args=(future,), name="flashrt-manifest", daemon=True
        )
        thread.start()
        return future

    def _refresh(self, future: concurrent.futures.Future[None]) -> None:
        assert self._fetch is not None
        try:
            manifest = self._fetch()
            self._memory = (time.time(), manifest)
            self._write(manifest)
        except Exception as exc:
            with self._lock:
                self._failures += 1
                delay = min(self.backoff_s * 2 ** (self._failures - 1), self.max_backoff_s)
                self._retry_at = time.monotonic() + delay
            self.last_error = str(exc) if isinstance(exc, StateManagerError) else repr(exc)
            logger.warning(
                "manifest refresh failed (%s); keeping the current manifest, next try in %.0f s",
                self.last_error,
                delay,
            )
        else:
            with self._lock:
                self._failures = 0
                self._retry_at = 0.0
            self.last_error = None
            self.refreshes += 1
            logger.info("manifest %s refreshed from the State Manager", self.path)
        finally:
            future.set_result(None)

    def _write(self, manifest: Mapping[str, Any]) -> None:
        """Replace the file atomically; an unwritable directory keeps the manifest in memory."""
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            logger.warning("manifest kept in memory only: cannot write in %s: %s", directory, exc)
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            Path(tmp).chmod(0o644)
            Path(tmp).replace(self.path)
        except OSError as exc:
            logger.warning("manifest kept in memory only: cannot write %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                Path(tmp).unlink()

    # --- what callers use ----------------------------------------------------------------

    async def get(self, wait_s: float | None = None) -> dict[str, Any] | None:
        """The manifest, refreshed first if stale and the refresh finishes within ``wait_s``."""
        if self.stale():
            future = self.refresh_in_background()
            if future is not None:
                bound = self.wait_s if wait_s is None else wait_s
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), bound)
        return self.current()

    def get_blocking(self, wait_s: float | None = None) -> dict[str, Any] | None:
        """:meth:`get` for threads without an event loop."""
        if self.stale():
            future = self.refresh_in_background()
            if future is not None:
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    future.result(self.wait_s if wait_s is None else wait_s)
        return self.current()


# --- the plugin ------------------------------------------------------------------------------


class ManifestPlugin(VolumeSettingsOwner):
    """``flashrt.manifest``; owns one :class:`ManifestReconciler` per manifest path, made on
    first use from ``volume`` (the environment's settings when none are given)."""

    def __init__(self, volume: VolumeSettings | None = None) -> None:
        super().__init__(volume)
        self._reconcilers: dict[str, ManifestReconciler] = {}

    def reconciler(self, context: PluginContext, path: Path) -> ManifestReconciler:
        """The reconciler for ``path``."""
        key = str(Path(path).absolute())
        reconciler = self._reconcilers.get(key)
        if reconciler is None:
            reconciler = ManifestReconciler.from_settings(
                Path(key), self.volume, context.settings.api_key
            )
            self._reconcilers[key] = reconciler
        return reconciler

    @hookimpl(trylast=True)
    def flashrt_reconcile_manifest(
        self, path: Path, context: PluginContext
    ) -> Coroutine[Any, Any, dict[str, Any] | None]:
        """The manifest at ``path``, refreshed from the State Manager when older than the TTL."""
        return self.reconciler(context, path).get()
