"""The volume cache itself: hydrating the local cache directory from the endpoint's tarball and
persisting it back, once at start-up and then debounced after installs.

Hydration extracts into a fresh staging directory *inside* the cache directory and moves each
file into place unless the worker already has it, so nothing lands outside the cache directory
and no path through a local symlink is followed. Persisting takes the :class:`VolumeLock` and
hands the merge to :mod:`.cache_tarball`. Volume and archive problems never raise: they come back
as a :class:`SyncResult`, and a read-only or full volume turns persisting off after one warning.
"""

# Tree walks here touch every file of a cache: plain str paths and os calls keep them cheap, so
# the pathlib rules are off for this module.
# ruff: noqa: PTH102, PTH104, PTH112, PTH114, PTH115, PTH117, PTH118, PTH120

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..safetar import ArchiveError, ExtractLimits, extract_fresh_with_report
from .cache_tarball import LocalEntry, Signature, write_merged
from .volume_lock import LockLostError, VolumeLock

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .volume_settings import VolumeSettings

__all__ = ["SyncResult", "VolumeCache"]

logger = logging.getLogger("flashrt.volume_cache")

#: Top-level names in the cache directory that are flashrt's own scratch space.
_SCRATCH_PREFIX = ".flashrt-"

_ENDPOINT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: Errors that mean "this volume cannot take writes": warn once, stop persisting.
_VOLUME_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What one hydrate or persist did (for logs, tests and ``flashrt`` diagnostics)."""

    action: Literal["skipped", "hydrated", "persisted", "failed"]
    reason: str | None = None
    files: int = 0
    bytes: int = 0


class VolumeCache:
    """Hydrates and persists one cache directory against one endpoint's volume tarball.

    Blocking methods (:meth:`hydrate`, :meth:`persist`) are thread-safe and never raise for
    volume or archive problems: they return a :class:`SyncResult`. :meth:`persist_soon` is the
    debounced asynchronous entry the plugin hands the runtime.
    """

    def __init__(self, settings: VolumeSettings, endpoint_id: str | None) -> None:
        self.settings = settings
        self.endpoint_id = endpoint_id
        self.cache_dir = Path(settings.cache_dir).absolute()
        self.volume_dir = Path(settings.volume_dir).absolute()
        self._lock = threading.Lock()
        #: name -> signature of what the volume tarball held when last read or written
        self._known: dict[str, Signature] | None = None
        self._write_disabled: str | None = None
        self._warned_endpoint = False
        self._dirty = False
        self._task: asyncio.Future[None] | None = None

    # --- where ---------------------------------------------------------------------------

    @property
    def tarball(self) -> Path:
        return self.volume_dir / ".cache" / f"cache-{self.endpoint_id}.tar"

    def unavailable(self) -> str | None:
        """Why this worker has no volume cache (``None`` when it has one)."""
        if self.settings.disable_volume_cache:
            return "disabled by FLASHRT_DISABLE_VOLUME_CACHE"
        if not self.endpoint_id:
            return "RUNPOD_ENDPOINT_ID is not set"
        if not _ENDPOINT_ID.fullmatch(self.endpoint_id):
            if not self._warned_endpoint:
                self._warned_endpoint = True
                logger.warning(
                    "volume cache off: RUNPOD_ENDPOINT_ID %r is not a plain identifier",
                    self.endpoint_id,
                )
            return "RUNPOD_ENDPOINT_ID is not a plain identifier"
        if not self.volume_dir.is_dir():
            return f"no volume at {self.volume_dir}"
        return None

    # --- hydrate -------------------------------------------------------------------------

    def hydrate(self) -> SyncResult:
        """Restore cache files from the volume tarball; local files are never overwritten."""
        reason = self.unavailable()
        if reason is not None:
            return SyncResult("skipped", reason)
        with self._lock:
            if not self.tarball.is_file():
                self._known = {}
                return SyncResult("skipped", "no cache tarball on the volume yet")
            limits = ExtractLimits(
                max_members=self.settings.cache_max_members,
                max_bytes=self.settings.cache_max_bytes,
            )
            started = time.monotonic()
            try:
                staging, report = extract_fresh_with_report(
                    self.tarball, self.cache_dir, limits, prefix=_SCRATCH_PREFIX + "hydrate-"
                )
            except FileNotFoundError:
                self._known = {}
                return SyncResult("skipped", "no cache tarball on the volume yet")
            except ArchiveError as exc:
                # Start empty; the next persist rewrites the tarball from good files.
                self._known = {}
                logger.warning("volume cache not restored: %s", exc)
                return SyncResult("failed", str(exc))
            except OSError as exc:
                logger.warning("volume cache not restored: %s: %s", type(exc).__name__, exc)
                return SyncResult("failed", f"{type(exc).__name__}: {exc}")
            try:
                files, nbytes = self._move_in(staging)
            except OSError as exc:
                logger.warning("volume cache partly restored: %s: %s", type(exc).__name__, exc)
                return SyncResult("failed", f"{type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            known: dict[str, Signature] = {
                name: (size, int(mtime), "") for name, (size, mtime, _) in report.files.items()
            }
            known.update({name: (0, 0, target) for name, target in report.symlinks.items()})
            self._known = known
            logger.info(
                "volume cache restored %d files (%d bytes) from %s in %.2f s",
                files,
                nbytes,
                self.tarball,
                time.monotonic() - started,
            )
            return SyncResult("hydrated", None, files, nbytes)

    def _move_in(self, staging: Path) -> tuple[int, int]:
        """Move staged entries into the cache directory without following any local link."""
        files = nbytes = 0
        safe_dirs: dict[str, bool] = {"": True}
        for dirpath, dirnames, filenames in os.walk(staging):
            rel_dir = os.path.relpath(dirpath, staging)
            rel_dir = "" if rel_dir == "." else rel_dir
            leaves = list(filenames)
            for name in list(dirnames):
                if os.path.islink(os.path.join(dirpath, name)):
                    leaves.append(name)  # a symlink to a directory is a leaf here
            for name in leaves:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                src = os.path.join(dirpath, name)
                dst = os.path.join(self.cache_dir, rel)
                if os.path.lexists(dst) or not self._safe_dir(rel_dir, safe_dirs):
                    continue
                size = os.lstat(src).st_size
                try:
                    os.link(src, dst, follow_symlinks=False)  # never replaces a file
                except FileExistsError:
                    continue
                except OSError:
                    os.rename(src, dst)
                files += 1
                nbytes += size
        return files, nbytes

    def _safe_dir(self, rel_dir: str, memo: dict[str, bool]) -> bool:
        """Create ``rel_dir`` under the cache directory; ``False`` if a component is a link."""
        if rel_dir in memo:
            return memo[rel_dir]
        parent = rel_dir.rpartition("/")[0]
        ok = self._safe_dir(parent, memo)
        if ok:
            path = os.path.join(self.cache_dir, rel_dir)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
            else:
                ok = stat.S_ISDIR(st.st_mode)
        memo[rel_dir] = ok
        return ok

    # --- persist -------------------------------------------------------------------------

    def persist(self, *, lock_wait_s: float | None = None) -> SyncResult:
        """Merge new local cache files into the volume tarball (no-op when nothing is new)."""
        reason = self.unavailable()
        if reason is not None:
            return SyncResult("skipped", reason)
        if self._write_disabled is not None:
            return SyncResult("skipped", self._write_disabled)
        with self._lock:
            local = self._scan_local()
            known = self._known
            if known is not None and all(
                known.get(name) == entry.signature for name, entry in local.items()
            ):
                return SyncResult("skipped", "no new cache files")
            lock = VolumeLock(
                self.tarball.with_name(self.tarball.name + ".lock"),
                stale_s=self.settings.cache_lock_stale_s,
                wait_s=self.settings.cache_lock_wait_s if lock_wait_s is None else lock_wait_s,
            )
            try:
                self.tarball.parent.mkdir(exist_ok=True)
                if not lock.acquire():
                    logger.info("volume cache busy (lock %s held by another worker)", lock.path)
                    return SyncResult("failed", "volume cache lock is held by another worker")
                try:
                    return self._merge_write(local, lock)
                finally:
                    lock.release()
            except LockLostError as exc:
                logger.warning("volume cache not persisted: %s", exc)
                return SyncResult("failed", str(exc))
            except OSError as exc:
                return self._volume_error(exc)

    def _volume_error(self, exc: OSError) -> SyncResult:
        message = f"{type(exc).__name__}: {exc}"
        if exc.errno in _VOLUME_WRITE_ERRNOS:
            self._write_disabled = f"volume cache cannot be written ({message})"
            logger.warning(
                "volume cache persisting turned off: %s; requests are not affected", message
            )
        else:
            logger.warning("volume cache not persisted: %s", message)
        return SyncResult("failed", message)

    def _scan_local(self) -> dict[str, LocalEntry]:
        """Regular files and in-cache symlinks of the cache directory, by relative name."""
        root = str(self.cache_dir)
        root_real = os.path.realpath(root)
        entries: dict[str, LocalEntry] = {}
        if not os.path.isdir(root):
            return entries
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            if not rel_dir:
                dirnames[:] = [d for d in dirnames if not d.startswith(_SCRATCH_PREFIX)]
            for name in [*dirnames, *filenames]:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                full = os.path.join(dirpath, name)
                try:
                    rel.encode("utf-8")
                    st = os.lstat(full)
                except (OSError, UnicodeEncodeError):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    target = self._local_link_target(full, root_real)
                    if target is not None:
                        entries[rel] = LocalEntry(full, 0, st.st_mtime, st.st_atime, target)
                elif stat.S_ISREG(st.st_mode):
                    entries[rel] = LocalEntry(full, st.st_size, st.st_mtime, st.st_atime)
        return entries

    @staticmethod
    def _local_link_target(full: str, root_real: str) -> str | None:
        """The relative target to store for a local symlink, or ``None`` if it leaves the cache."""
        try:
            raw = os.readlink(full)
        except OSError:
            return None
        absolute = os.path.normpath(os.path.join(os.path.dirname(full), raw))
        real = os.path.realpath(full)
        if not (real == root_real or real.startswith(root_real + os.sep)):
            return None
        return os.path.relpath(absolute, os.path.dirname(full)) if os.path.isabs(raw) else raw

    def _merge_write(self, local: dict[str, LocalEntry], lock: VolumeLock) -> SyncResult:
        outcome = write_merged(
            self.tarball,
            local,
            lock,
            max_bytes=self.settings.cache_max_bytes,
            entry_depth=self.settings.cache_entry_depth,
        )
        self._known = outcome.known
        logger.info(
            "volume cache persisted %d files (%d bytes) to %s",
            outcome.files,
            outcome.bytes,
            self.tarball,
        )
        return SyncResult("persisted", None, outcome.files, outcome.bytes)

    # --- debounced, asynchronous ---------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether a persist is scheduled or running."""
        return self._task is not None and not self._task.done()

    async def persist_soon(self, run_blocking: Callable[..., Awaitable[Any]]) -> None:
        """Persist after ``cache_persist_debounce_s`` of quiet; calls meanwhile coalesce.

        Every caller's awaitable resolves once a persist that started after its call finished.
        """
        self._dirty = True
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.ensure_future(self._persist_loop(run_blocking))
        await asyncio.shield(task)

    async def _persist_loop(self, run_blocking: Callable[..., Awaitable[Any]]) -> None:
        while self._dirty:
            await asyncio.sleep(self.settings.cache_persist_debounce_s)
            self._dirty = False
            try:
                await run_blocking(self.persist)
            except Exception:
                logger.exception("volume cache persist failed unexpectedly")

    async def flush(self, run_blocking: Callable[..., Awaitable[Any]], lock_wait_s: float) -> None:
        """Persist now what a pending debounced persist would have (worker shutting down)."""
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._dirty = False
        await run_blocking(self.persist, lock_wait_s=lock_wait_s)
