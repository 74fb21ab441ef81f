"""The cross-worker lock guarding the volume cache tarball.

Workers of one endpoint share the network volume and no other channel, so the lock is a file
created with ``O_EXCL`` holding pid, host, time and a random token. A holder that died must not
block persisting forever: a lock older than its stale timeout is broken, and a live holder
refreshes the file's mtime while it works so it is not taken for dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["LockLostError", "VolumeLock"]

logger = logging.getLogger("flashrt.volume_cache")


class LockLostError(RuntimeError):
    """The lock was broken as stale by another worker while we held it."""


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
