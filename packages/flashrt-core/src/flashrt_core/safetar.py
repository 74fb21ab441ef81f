"""Tar extraction that cannot write outside its target.

The reference worker extracted the volume cache into ``/`` and let artifact symlink members redirect
later members anywhere (docs/contracts.md, defect 9). Here every archive is read as a stream into a
*fresh* directory, member by member, under rules checked before anything touches the disk:

* names are relative and never contain ``..`` (absolute names and traversal are refused);
* a member's parent may not be a link or a file of the same archive, so nothing is ever written
  *through* a symlink; duplicate names involving a link are refused;
* symlink targets are relative and stay inside the tree (checked by name, and again with
  ``realpath`` once everything is on disk); hard links only point at earlier regular files;
* devices, FIFOs and unknown member types are refused; setuid/setgid bits are dropped and nothing
  is chowned, so running as root gains an archive nothing;
* caps on the member count and the total size, checked as the stream is read.

A refused or broken archive leaves only the fresh directory, which is removed; the target is
replaced (``extract_replace``) only after the whole archive extracted cleanly.
"""

# Tree walks here touch every file of a cache or artifact: plain str paths and os calls keep
# them cheap, so the pathlib rules are off for this module.
# ruff: noqa: PTH101, PTH103, PTH118, PTH120, PTH211

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tarfile

__all__ = [
    "ArchiveError",
    "ArchiveLimitError",
    "CorruptArchiveError",
    "ExtractLimits",
    "ExtractReport",
    "UnsafeArchiveError",
    "check_symlink_target",
    "extract_fresh",
    "extract_fresh_with_report",
    "extract_replace",
    "normalize_member_name",
]


class ArchiveError(Exception):
    """An archive could not be extracted; the message names the archive and the reason."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the target or is of a kind never extracted (device, FIFO)."""


class ArchiveLimitError(UnsafeArchiveError):
    """The archive holds more members or more bytes than the caps allow."""


class CorruptArchiveError(ArchiveError):
    """The archive is truncated or not a (compressed) tar file."""


@dataclasses.dataclass(frozen=True)
class ExtractLimits:
    """Caps that keep a hostile or runaway archive from filling the disk."""

    max_members: int
    max_bytes: int


@dataclasses.dataclass
class ExtractReport:
    """What an extraction wrote: counts, and every regular file with its size and times."""

    members: int = 0
    bytes: int = 0
    #: normalized name -> (size, mtime, atime or None) for regular files and hard links
    files: dict[str, tuple[int, float, float | None]] = dataclasses.field(default_factory=dict)
    #: normalized name -> link target for symlinks
    symlinks: dict[str, str] = dataclasses.field(default_factory=dict)


def normalize_member_name(name: str) -> str | None:
    """The safe relative form of a member name (``a/b``); ``None`` for the archive root.

    Raises :class:`UnsafeArchiveError` for absolute names and names with ``..`` components.
    """
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"member {name!r}: empty or NUL in name")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member {name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r}: '..' in path")
    return "/".join(parts) if parts else None


def check_symlink_target(member: str, linkname: str) -> str:
    """The normalized in-tree path a symlink ``member -> linkname`` points at, or refuse.

    Raises :class:`UnsafeArchiveError` for absolute targets and targets that climb out.
    """
    if not linkname or "\x00" in linkname:
        raise UnsafeArchiveError(f"member {member!r}: empty link target")
    if linkname.startswith("/"):
        raise UnsafeArchiveError(f"member {member!r}: link to absolute path {linkname!r}")
    stack = member.split("/")[:-1]
    for part in linkname.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(
                    f"member {member!r}: link target {linkname!r} escapes the target directory"
                )
            stack.pop()
        else:
            stack.append(part)
    return "/".join(stack)


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


_READ_ERRORS: tuple[type[BaseException], ...] | None = None


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the archive bytes are bad' (not 'the disk is full')."""
    global _READ_ERRORS
    if _READ_ERRORS is None:
        import gzip
        import tarfile
        import zlib

        errors: list[type[BaseException]] = [
            tarfile.TarError,
            EOFError,
            zlib.error,
            gzip.BadGzipFile,
        ]
        with contextlib.suppress(ImportError):
            import lzma

            errors.append(lzma.LZMAError)
        _READ_ERRORS = tuple(errors)
    return _READ_ERRORS


class _Extractor:
    """Streams one archive into an empty directory, enforcing the module's rules."""

    def __init__(self, root: Path, limits: ExtractLimits, label: str) -> None:
        self.root = root
        self.root_real = os.path.realpath(root)
        self.limits = limits
        self.label = label
        self.kinds: dict[str, str] = {}  # name -> "dir" | "file" | "symlink" | "hardlink"
        self.dirs: list[tuple[str, int, float]] = []
        self.report = ExtractReport()
        self._checked_parents: set[str] = set()

    def refuse(self, exc: UnsafeArchiveError) -> UnsafeArchiveError:
        return type(exc)(f"{self.label}: {exc}")

    def run(self, tar: tarfile.TarFile) -> ExtractReport:
        for info in tar:
            self.report.members += 1
            if self.report.members > self.limits.max_members:
                raise ArchiveLimitError(
                    f"{self.label}: more than {self.limits.max_members} members"
                )
            self.member(tar, info)
        self.finish()
        return self.report

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        try:
            name = normalize_member_name(info.name)
        except UnsafeArchiveError as exc:
            raise self.refuse(exc) from None
        if name is None:
            if not info.isdir():
                raise UnsafeArchiveError(f"{self.label}: member {info.name!r} replaces the root")
            return
        kind = self.kind_of(info, name)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            parent_kind = self.kinds.get(parent)
            if parent_kind not in (None, "dir"):
                raise UnsafeArchiveError(
                    f"{self.label}: member {info.name!r} would be written through "
                    f"{parent_kind} {parent!r}"
                )
        previous = self.kinds.get(name)
        if previous is not None and (previous != kind or kind in ("symlink", "hardlink")):
            raise UnsafeArchiveError(
                f"{self.label}: member {info.name!r} appears twice ({previous} and {kind})"
            )
        path = os.path.join(self.root, *parts)
        self.ensure_parent(name, path)
        if kind == "dir":
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.dirs.append((path, info.mode, info.mtime))
        elif kind == "file":
            self.report.bytes += info.size
            if self.report.bytes > self.limits.max_bytes:
                raise ArchiveLimitError(
                    f"{self.label}: more than {self.limits.max_bytes} bytes unpacked"
                )
            self.write_file(tar, info, path)
            atime = _pax_float(info, "atime")
            self.report.files[name] = (info.size, info.mtime, atime)
        elif kind == "symlink":
            try:
                check_symlink_target(name, info.linkname)
            except UnsafeArchiveError as exc:
                raise self.refuse(exc) from None
            os.symlink(info.linkname, path)
            self.report.symlinks[name] = info.linkname
        else:  # hardlink
            try:
                target = normalize_member_name(info.linkname)
            except UnsafeArchiveError as exc:
                raise self.refuse(exc) from None
            if target is None or self.kinds.get(target) != "file":
                raise UnsafeArchiveError(
                    f"{self.label}: hard link {info.name!r} -> {info.linkname!r} does not point "
                    "at an earlier regular file of the archive"
                )
            os.link(os.path.join(self.root, *target.split("/")), path, follow_symlinks=False)
            self.report.files[name] = self.report.files[target]
        self.kinds[name] = kind

    def kind_of(self, info: tarfile.TarInfo, name: str) -> str:
        if info.isdir():
            return "dir"
        if info.isreg():
            return "file"
        if info.issym():
            return "symlink"
        if info.islnk():
            return "hardlink"
        what = "device" if info.isdev() else "unsupported"
        if info.isfifo():
            what = "FIFO"
        raise UnsafeArchiveError(f"{self.label}: member {name!r} is a {what} member")

    def ensure_parent(self, name: str, path: str) -> None:
        parent_name = name.rpartition("/")[0]
        parent = os.path.dirname(path)
        if parent_name and parent_name not in self._checked_parents:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            # Defence in depth: the rules above make this impossible, the disk has the last word.
            if not _is_within(os.path.realpath(parent), self.root_real):
                raise UnsafeArchiveError(
                    f"{self.label}: member {name!r} resolves outside the target directory"
                )
            self._checked_parents.add(parent_name)
            # Directories made implicitly count as directories: a later link or file of the
            # same name is then a clash, refused as such.
            parts = parent_name.split("/")
            for i in range(1, len(parts) + 1):
                self.kinds.setdefault("/".join(parts[:i]), "dir")

    def write_file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, path: str) -> None:
        source = tar.extractfile(info)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, 1024 * 1024)
            os.fchmod(out.fileno(), (info.mode & 0o777) | 0o600)
        atime = _pax_float(info, "atime")
        mtime = float(info.mtime)
        os.utime(path, (mtime if atime is None else atime, mtime), follow_symlinks=False)

    def finish(self) -> None:
        for name in self.report.symlinks:
            link = os.path.join(self.root, *name.split("/"))
            if not _is_within(os.path.realpath(link), self.root_real):
                raise UnsafeArchiveError(
                    f"{self.label}: symlink {name!r} -> {self.report.symlinks[name]!r} "
                    "resolves outside the target directory"
                )
        for path, mode, mtime in reversed(self.dirs):
            os.chmod(path, (mode & 0o777) | 0o700)
            with contextlib.suppress(OSError):
                os.utime(path, (float(mtime), float(mtime)))


def _pax_float(info: tarfile.TarInfo, key: str) -> float | None:
    raw = info.pax_headers.get(key)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _extract_into(archive: Path, root: Path, limits: ExtractLimits) -> ExtractReport:
    import tarfile

    label = f"archive {str(archive)!r}"
    with open(archive, "rb") as raw:  # FileNotFoundError passes through: callers retry on it
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                return _Extractor(root, limits, label).run(tar)
        except _read_errors() as exc:
            raise CorruptArchiveError(f"{label} is truncated or corrupt: {exc}") from exc


def extract_fresh(archive: Path, parent: Path, limits: ExtractLimits, *, prefix: str) -> Path:
    """Extract ``archive`` into a new directory created inside ``parent``; return that directory.

    On any failure the new directory is removed and the exception propagates:
    :class:`UnsafeArchiveError`, :class:`CorruptArchiveError`, ``FileNotFoundError`` (no
    archive) or another ``OSError`` (the disk).
    """
    return extract_fresh_with_report(archive, parent, limits, prefix=prefix)[0]


def extract_fresh_with_report(
    archive: Path, parent: Path, limits: ExtractLimits, *, prefix: str
) -> tuple[Path, ExtractReport]:
    """Like :func:`extract_fresh`, also returning what was written."""
    parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        report = _extract_into(archive, fresh, limits)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return fresh, report


def extract_replace(archive: Path, dest: Path, limits: ExtractLimits) -> ExtractReport:
    """Extract ``archive`` next to ``dest``, then swap it in for ``dest`` with renames.

    ``dest`` is never seen half-written: until the archive extracted completely it keeps its
    old content (or stays absent); the swap itself is two renames on one file system.
    """
    dest = Path(dest).absolute()
    fresh, report = extract_fresh_with_report(
        archive, dest.parent, limits, prefix=f".{dest.name}.new-"
    )
    old: Path | None = None
    try:
        if os.path.lexists(dest):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            old = old / "previous"
            dest.rename(old)
        fresh.rename(dest)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        if old is not None and not os.path.lexists(dest) and os.path.lexists(old):
            old.rename(dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    return report
