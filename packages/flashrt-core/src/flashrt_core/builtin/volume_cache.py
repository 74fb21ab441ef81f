"""Built-in plugin ``flashrt.volume-cache``: package caches kept on the network volume.

One tarball per endpoint, ``<volume>/.cache/cache-<RUNPOD_ENDPOINT_ID>.tar`` (REFERENCE §6),
holds the local cache directory (``/root/.cache``: uv, pip, apt downloads) so a cold worker
installs from disk instead of the internet.

* **hydrate** (once, at start-up): the tarball is extracted with :mod:`flashrt_core.safetar` into
  a fresh staging directory *inside* the cache directory, then each file is moved into place
  unless the worker already has it. Nothing lands outside the cache directory (the reference
  extracted into ``/``), and no path through a local symlink is followed.
* **persist** (after installs that added files, debounced, in the background): under a lock file
  on the volume, the current tarball is re-read and merged with the local files, pruned to the
  size cap by least recent use, written to a temporary name and renamed over the tarball. Two
  workers persisting at once therefore both end up in the tarball, and readers only ever see a
  complete one.

The lock is a file created with ``O_EXCL`` holding pid, host, time and a random token; one older
than ``FLASHRT_CACHE_LOCK_STALE_S`` is broken (the holder refreshes it while it works). A missing
volume is a silent no-op; a read-only or full volume gives one warning and turns persisting off;
request handling never waits on any of it.
"""

# Tree walks here touch every file of a cache or artifact: plain str paths and os calls keep
# them cheap, so the pathlib rules are off for this module.
# ruff: noqa: PTH102, PTH104, PTH112, PTH114, PTH115, PTH117, PTH118, PTH120

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import random
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ..hookspecs import hookimpl
from ..safetar import (
    ArchiveError,
    ExtractLimits,
    UnsafeArchiveError,
    check_symlink_target,
    extract_fresh_with_report,
    normalize_member_name,
)

if TYPE_CHECKING:
    import tarfile
    from collections.abc import Awaitable, Callable, Coroutine

    from ..runtime import Runtime
    from .volume_settings import VolumeSettings

__all__ = [
    "STATE_KEY",
    "SyncResult",
    "VolumeCache",
    "VolumeLock",
    "flashrt_shutdown",
    "flashrt_sync_cache",
]

logger = logging.getLogger("flashrt.volume_cache")

#: ``runtime.state`` key of the runtime's :class:`VolumeCache`.
STATE_KEY = "flashrt.volume_cache"

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


#: (size, whole-second mtime, symlink target or "") identifies a cache entry's version.
Signature = tuple[int, int, str]


@dataclasses.dataclass(frozen=True)
class _LocalEntry:
    path: str
    size: int
    mtime: float
    atime: float
    linkname: str | None = None

    @property
    def signature(self) -> Signature:
        if self.linkname is not None:
            return (0, 0, self.linkname)
        return (self.size, int(self.mtime), "")


class _LockLost(RuntimeError):
    pass


class VolumeLock:
    """A lock file on a shared (possibly network) file system, with stale-lock breaking."""

    def __init__(self, path: Path, *, stale_s: float, wait_s: float) -> None:
        self.path = path
        self.stale_s = stale_s
        self.wait_s = wait_s
        self.token = f"{os.getpid()}-{random.getrandbits(64):016x}"
        self._held = False
        self._touched = 0.0

    def acquire(self) -> bool:
        """Take the lock, waiting up to ``wait_s``; ``False`` if another worker kept it.

        ``OSError`` other than "exists" (read-only, full volume) propagates.
        """
        deadline = time.monotonic() + self.wait_s
        poll = 0.02
        content = f"{os.getpid()} {socket.gethostname()} {time.time():.3f} {self.token}\n"
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                if time.monotonic() >= deadline:
                    return False
                time.sleep(poll * (0.5 + random.random()))
                poll = min(poll * 2, 0.5)
                continue
            try:
                os.write(fd, content.encode())
            finally:
                os.close(fd)
            self._held = True
            self._touched = time.monotonic()
            return True

    def _break_if_stale(self) -> bool:
        """Remove an abandoned lock; ``True`` when the caller should retry at once."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age <= self.stale_s:
            return False
        grave = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            self.path.rename(grave)
        except FileNotFoundError:
            return True
        try:
            still_stale = time.time() - grave.stat().st_mtime > self.stale_s
            holder = grave.read_text(errors="replace").strip()
        except OSError:
            still_stale, holder = True, "?"
        if not still_stale:
            # Another worker took the lock between our stat and rename: hand it back.
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            except OSError:
                if not os.path.lexists(self.path):
                    grave.rename(self.path)
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        logger.warning(
            "broke a stale volume cache lock %s (%s, %.0f s old)", self.path, holder, age
        )
        return True

    def owned(self) -> bool:
        """Whether the lock file on disk is still ours (nobody broke it as stale)."""
        try:
            return self.path.read_text(errors="replace").split()[-1:] == [self.token]
        except OSError:
            return False

    def touch(self) -> None:
        """Refresh the lock's mtime now and then so a long persist is not taken for dead."""
        now = time.monotonic()
        if self._held and now - self._touched > self.stale_s / 4:
            self._touched = now
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self.owned():
            self.path.unlink(missing_ok=True)
        else:
            logger.warning("volume cache lock %s was taken over while held", self.path)


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
            except _LockLost as exc:
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

    def _scan_local(self) -> dict[str, _LocalEntry]:
        """Regular files and in-cache symlinks of the cache directory, by relative name."""
        root = str(self.cache_dir)
        root_real = os.path.realpath(root)
        entries: dict[str, _LocalEntry] = {}
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
                        entries[rel] = _LocalEntry(full, 0, st.st_mtime, st.st_atime, target)
                elif stat.S_ISREG(st.st_mode):
                    entries[rel] = _LocalEntry(full, st.st_size, st.st_mtime, st.st_atime)
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

    def _merge_write(self, local: dict[str, _LocalEntry], lock: VolumeLock) -> SyncResult:
        import tarfile

        tarball = self.tarball
        tmp = tarball.with_name(f".{tarball.name}.tmp-{lock.token}")
        with contextlib.ExitStack() as stack:
            stack.callback(tmp.unlink, missing_ok=True)
            old: dict[str, tarfile.TarInfo] = {}
            old_tar: tarfile.TarFile | None = None
            try:
                raw = stack.enter_context(open(tarball, "rb"))
            except FileNotFoundError:
                raw = None
            if raw is not None:
                old_tar, old = _read_old(stack, raw, tarball)
            plan = self._plan(old, local)
            kept = self._prune(plan)
            written: set[str] = set()
            nbytes = 0
            with open(tmp, "wb") as out:
                with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tw:
                    for name in sorted(kept):
                        lock.touch()
                        source, used = plan[name]
                        if isinstance(source, _LocalEntry):
                            size = _add_local(tw, name, source, used)
                            if size is None:
                                continue
                        else:
                            assert old_tar is not None
                            size = _add_old(tw, old_tar, name, source, used)
                        written.add(name)
                        nbytes += size
                out.flush()
                os.fsync(out.fileno())
            if not lock.owned():
                raise _LockLost(f"lock {lock.path} was broken as stale while persisting")
            tmp.replace(tarball)
            _fsync_dir(tarball.parent)
            self._known = {name: _signature_of(plan[name][0]) for name in written}
            logger.info(
                "volume cache persisted %d files (%d bytes) to %s", len(written), nbytes, tarball
            )
            return SyncResult("persisted", None, len(written), nbytes)

    def _plan(
        self, old: dict[str, tarfile.TarInfo], local: dict[str, _LocalEntry]
    ) -> dict[str, tuple[_LocalEntry | tarfile.TarInfo, float]]:
        """Pick each name's newest version (local wins ties) and its last-use time."""
        plan: dict[str, tuple[_LocalEntry | tarfile.TarInfo, float]] = {}
        for name, info in old.items():
            plan[name] = (info, _used(info))
        for name, entry in local.items():
            previous = plan.get(name)
            if previous is None:
                plan[name] = (entry, entry.atime)
                continue
            kept, used = previous
            used = max(used, entry.atime)
            newer_old = (
                not isinstance(kept, _LocalEntry)
                and kept.isreg()
                and float(kept.mtime) > entry.mtime + 1e-6
            )
            plan[name] = (kept if newer_old else entry, used)
        # A name under another entry that is a file or link would make the tarball refused at
        # hydration; drop one side of any such clash, the volume's copy before ours.
        for name in sorted(plan):
            if name not in plan:
                continue
            parts = name.split("/")
            for i in range(1, len(parts)):
                ancestor = "/".join(parts[:i])
                if ancestor in plan:
                    ours = isinstance(plan[name][0], _LocalEntry)
                    theirs = not isinstance(plan[ancestor][0], _LocalEntry)
                    plan.pop(ancestor if ours and theirs else name)
                    break
        return plan

    def _prune(self, plan: dict[str, tuple[_LocalEntry | tarfile.TarInfo, float]]) -> set[str]:
        """Keep the most recently used entries (groups of ``cache_entry_depth``) within the cap."""
        depth = max(1, self.settings.cache_entry_depth)
        groups: dict[str, list[str]] = {}
        for name in plan:
            groups.setdefault("/".join(name.split("/")[:depth]), []).append(name)
        ranked = []
        for key, names in groups.items():
            size = sum(_size_of(plan[n][0]) + 512 for n in names)
            used = max(plan[n][1] for n in names)
            ranked.append((used, key, size, names))
        ranked.sort(key=lambda row: (-row[0], row[1]))
        kept: set[str] = set()
        total = dropped = 0
        for _used_at, _key, size, names in ranked:
            if total + size > self.settings.cache_max_bytes:
                dropped += len(names)
                continue
            total += size
            kept.update(names)
        if dropped:
            logger.info("volume cache over its cap: %d least recently used files pruned", dropped)
        return kept

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


def _read_old(
    stack: contextlib.ExitStack, raw: BinaryIO, tarball: Path
) -> tuple[tarfile.TarFile | None, dict[str, tarfile.TarInfo]]:
    """Open the current tarball for copying; a damaged one keeps the members before the damage."""
    import tarfile

    try:
        tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r:"))  # noqa: SIM115
    except (tarfile.TarError, EOFError) as exc:
        logger.warning("volume cache tarball %s is unreadable (%s); rewriting it", tarball, exc)
        return None, {}
    members: list[tarfile.TarInfo] = []
    end = os.fstat(raw.fileno()).st_size
    try:
        for info in tar:
            members.append(info)
    except (tarfile.TarError, EOFError) as exc:
        logger.warning(
            "volume cache tarball %s is damaged (%s); keeping what precedes it", tarball, exc
        )
        members = [m for m in members if m.offset_data + m.size <= end]
    return tar, _index_members(members)


def _index_members(members: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """The tarball's usable entries by normalized name (later duplicates win)."""
    index: dict[str, tarfile.TarInfo] = {}
    for info in members:
        try:
            name = normalize_member_name(info.name)
            if name is None:
                continue
            if info.issym():
                check_symlink_target(name, info.linkname)
            elif not info.isreg():
                continue
        except UnsafeArchiveError as exc:
            logger.warning("volume cache tarball entry dropped: %s", exc)
            continue
        index[name] = info
    return index


def _used(info: tarfile.TarInfo) -> float:
    raw = info.pax_headers.get("atime")
    try:
        return float(raw) if raw is not None else float(info.mtime)
    except ValueError:
        return float(info.mtime)


def _size_of(source: _LocalEntry | tarfile.TarInfo) -> int:
    if isinstance(source, _LocalEntry):
        return source.size if source.linkname is None else 0
    return source.size if source.isreg() else 0


def _signature_of(source: _LocalEntry | tarfile.TarInfo) -> Signature:
    if isinstance(source, _LocalEntry):
        return source.signature
    if source.issym():
        return (0, 0, source.linkname)
    return (source.size, int(source.mtime), "")


def _add_local(tw: tarfile.TarFile, name: str, entry: _LocalEntry, used: float) -> int | None:
    """Append one local file or link; ``None`` if it vanished or changed kind meanwhile."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.pax_headers = {"atime": f"{used:.6f}"}
    if entry.linkname is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.linkname
        info.mode = 0o777
        info.mtime = entry.mtime
        tw.addfile(info)
        return 0
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        info.size = st.st_size
        info.mode = st.st_mode & 0o777
        info.mtime = st.st_mtime
        tw.addfile(info, handle)
    return st.st_size


def _add_old(
    tw: tarfile.TarFile, old_tar: tarfile.TarFile, name: str, info: tarfile.TarInfo, used: float
) -> int:
    import copy

    new = copy.copy(info)
    new.name = name
    new.pax_headers = {**info.pax_headers, "atime": f"{used:.6f}"}
    new.pax_headers.pop("path", None)
    new.uid = new.gid = 0
    new.uname = new.gname = ""
    if info.isreg():
        tw.addfile(new, old_tar.extractfile(info))
        return info.size
    tw.addfile(new)
    return 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the plugin ------------------------------------------------------------------------------


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
