"""Writing the volume cache tarball: plan, prune and merge with what the volume already holds.

Several workers persist into one tarball, so a write never replaces it with only the local
files: the current tarball is re-read, each name keeps its newest version, the whole is pruned
to the size cap by least recent use, and the result is written under a temporary name and renamed
over the tarball, so readers only ever see a complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from ..safetar import UnsafeArchiveError, check_symlink_target, normalize_member_name
from .volume_lock import LockLostError

if TYPE_CHECKING:
    import tarfile
    from pathlib import Path

    from .volume_lock import VolumeLock

__all__ = ["LocalEntry", "MergeOutcome", "Signature", "write_merged"]

logger = logging.getLogger("flashrt.volume_cache")

#: (size, whole-second mtime, symlink target or "") identifies a cache entry's version.
Signature = tuple[int, int, str]

#: Each name's chosen version (local or from the tarball) and its last-use time.
Plan = dict[str, "tuple[LocalEntry | tarfile.TarInfo, float]"]


@dataclasses.dataclass(frozen=True)
class LocalEntry:
    """A regular file or in-cache symlink of the local cache directory."""

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


@dataclasses.dataclass(frozen=True)
class MergeOutcome:
    """What a merged write put in the tarball; ``known`` lets the next persist skip no-ops."""

    files: int
    bytes: int
    known: dict[str, Signature]


def write_merged(
    tarball: Path,
    local: dict[str, LocalEntry],
    lock: VolumeLock,
    *,
    max_bytes: int,
    entry_depth: int,
) -> MergeOutcome:
    """Merge ``local`` into ``tarball`` under ``lock``.

    Raises :class:`LockLostError` when the lock was broken meanwhile (the tarball is left as it
    was) and ``OSError`` for volume problems, which the caller turns into a :class:`SyncResult`.
    """
    import tarfile

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
        plan = plan_merge(old, local)
        kept = prune(plan, max_bytes=max_bytes, entry_depth=entry_depth)
        written: set[str] = set()
        nbytes = 0
        with open(tmp, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tw:
                for name in sorted(kept):
                    lock.touch()
                    source, used = plan[name]
                    if isinstance(source, LocalEntry):
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
            raise LockLostError(f"lock {lock.path} was broken as stale while persisting")
        tmp.replace(tarball)
        _fsync_dir(tarball.parent)
        known = {name: _signature_of(plan[name][0]) for name in written}
        return MergeOutcome(len(written), nbytes, known)


def plan_merge(old: dict[str, tarfile.TarInfo], local: dict[str, LocalEntry]) -> Plan:
    """Pick each name's newest version (local wins ties) and its last-use time."""
    plan: Plan = {}
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
            not isinstance(kept, LocalEntry)
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
                ours = isinstance(plan[name][0], LocalEntry)
                theirs = not isinstance(plan[ancestor][0], LocalEntry)
                plan.pop(ancestor if ours and theirs else name)
                break
    return plan


def prune(plan: Plan, *, max_bytes: int, entry_depth: int) -> set[str]:
    """Keep the most recently used entries (groups of ``entry_depth``) within ``max_bytes``."""
    depth = max(1, entry_depth)
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
        if total + size > max_bytes:
            dropped += len(names)
            continue
        total += size
        kept.update(names)
    if dropped:
        logger.info("volume cache over its cap: %d least recently used files pruned", dropped)
    return kept


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


def _size_of(source: LocalEntry | tarfile.TarInfo) -> int:
    if isinstance(source, LocalEntry):
        return source.size if source.linkname is None else 0
    return source.size if source.isreg() else 0


def _signature_of(source: LocalEntry | tarfile.TarInfo) -> Signature:
    if isinstance(source, LocalEntry):
        return source.signature
    if source.issym():
        return (0, 0, source.linkname)
    return (source.size, int(source.mtime), "")


def _add_local(tw: tarfile.TarFile, name: str, entry: LocalEntry, used: float) -> int | None:
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
