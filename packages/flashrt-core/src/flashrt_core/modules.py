"""Safe materialisation of a request's ``modules`` (local source files the code imports)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import StageError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["MOUNT_PREFIX", "ModuleMount", "top_level_names", "validate_modules"]

#: How each mount directory's name starts: the executor's integrity check knows a request's
#: own modules by it.
MOUNT_PREFIX = "flashrt-modules-"


def _fail(message: str) -> StageError:
    return StageError("decode", f"modules: {message}")


def validate_modules(modules: Mapping[str, Any], max_bytes: int) -> list[tuple[PurePosixPath, str]]:
    """Check every path and size before anything touches the disk."""
    checked: list[tuple[PurePosixPath, str]] = []
    total = 0
    for raw, source in modules.items():
        if not isinstance(source, str):
            raise _fail(f"{raw!r}: source must be a string, got {type(source).__name__}")
        if not raw or "\\" in raw or "\x00" in raw:
            raise _fail(f"{raw!r}: not a POSIX relative path")
        if raw.startswith("/"):
            raise _fail(f"{raw!r}: absolute paths are not allowed")
        path = PurePosixPath(raw)
        if any(part in ("..", ".", "") for part in raw.split("/")):
            raise _fail(f"{raw!r}: '..', '.' and empty path segments are not allowed")
        total += len(source.encode("utf-8", "surrogatepass"))
        if total > max_bytes:
            raise _fail(f"total size exceeds the limit of {max_bytes} bytes")
        checked.append((path, source))
    return checked


def top_level_names(files: list[tuple[PurePosixPath, str]]) -> frozenset[str]:
    """Import names a set of module files claims (``pkg/x.py`` -> ``pkg``, ``m.py`` -> ``m``)."""
    names = set()
    for path, _ in files:
        first = path.parts[0]
        names.add(first[:-3] if len(path.parts) == 1 and first.endswith(".py") else first)
    return frozenset(names)


class ModuleMount:
    """A temp dir holding the files, on ``sys.path`` between :meth:`mount` and :meth:`unmount`.

    Unmounting also drops the modules imported from it from ``sys.modules``, so the next request
    with a different ``helper.py`` imports its own.
    """

    def __init__(self, files: list[tuple[PurePosixPath, str]], tmp_root: Path | None) -> None:
        self.files = files
        self.tmp_root = tmp_root
        self.path: Path | None = None

    def mount(self) -> Path:
        root = Path(tempfile.mkdtemp(prefix=MOUNT_PREFIX, dir=self.tmp_root))
        self.path = root  # set first: unmount() removes a half-written dir too
        for rel, source in self.files:
            target = root.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source, encoding="utf-8")
        sys.path.insert(0, str(root))
        return root

    def unmount(self) -> None:
        if self.path is None:
            return
        root = str(self.path)
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        prefix = root + "/"
        for name, module in list(sys.modules.items()):
            places = [getattr(module, "__file__", None) or ""]
            places += list(getattr(module, "__path__", None) or ())
            if any(str(p).startswith(prefix) for p in places):
                sys.modules.pop(name, None)
        shutil.rmtree(root, ignore_errors=True)
        self.path = None
