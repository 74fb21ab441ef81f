"""One install at a time per environment, across processes, and a stamp of the last one.

A worker may run several executor processes, each with its own installer objects, whose asyncio
locks serialise installs only within one process. Two uv runs writing one site-packages at once
can corrupt it, and a second apt-get fails on dpkg's lock, so each installer's critical section
(re-check what is missing, install) also holds an ``fcntl.flock`` on a lock file:

- the file is in a per-user directory of the system temp dir, named from a hash of what it
  guards (the interpreter's ``sys.prefix``, dpkg's status database). Not inside the environment:
  that may be read-only to the worker (a system interpreter) or on a network volume, where flock
  is unreliable; the temp dir is local, writable, and shared by every executor of a worker (they
  inherit its environment). Per user, so another user cannot create the file first and deny it;
- the kernel drops a flock when its holder dies, so a crashed executor leaves no stale lock;
- it is taken by polling ``LOCK_NB`` on the event loop, never by a blocking ``flock`` in a
  thread: a waiter ties up no pool thread, its wait is bounded, and a cancelled waiter simply
  stops polling (a thread blocked in ``flock`` could not be called back);
- after each install the holder appends one byte, so the file's size is a generation: a process
  that compares one ``stat`` per request with what it saw last learns that another process
  changed the environment, and drops what that may have made stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .proc import InstallError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["InstallLock", "lock_directory"]

#: First and longest pause between two tries of a held lock (seconds).
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.25


def lock_directory() -> Path:
    """This user's lock directory in the system temp dir (``$TMPDIR`` when set)."""
    return Path(tempfile.gettempdir()) / f"flashrt-locks-{os.getuid()}"


class InstallLock:
    """A cross-process lock on one environment's installs, with its generation stamp."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        #: What it guards, for messages ("the Python environment /opt/venv").
        self.what = what
        self._fd: int | None = None

    @classmethod
    def for_key(cls, kind: str, key: str, what: str, directory: Path | None = None) -> InstallLock:
        """The lock of ``key`` (a path: it is resolved), a file named from its hash."""
        digest = hashlib.sha256(os.path.realpath(key).encode()).hexdigest()[:20]
        return cls((directory or lock_directory()) / f"{kind}-{digest}.lock", what)

    # -- the generation --------------------------------------------------------------------------

    def stamp(self) -> tuple[int, int, int] | None:
        """The file's identity and size; it changes after every install by any process."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size)

    def bump(self) -> None:
        """Mark the environment as changed (only while held)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, b".")

    # -- taking it ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, timeout_s: float) -> AsyncIterator[float]:
        """Hold the lock for the block; yields the seconds waited for another process.

        Raises :class:`InstallError` naming the lock file (and its holder) when another process
        keeps it past ``timeout_s``, or when the file cannot be opened. Not re-entrant: callers
        serialise their own holds (a second hold in one process waits for the first).
        """
        started = time.monotonic()
        try:
            # On the loop: a mkdir and an open in the local temp dir take microseconds, and an
            # open handed to a thread would leak its descriptor if the waiter were cancelled.
            fd = self._open()
        except OSError as exc:
            raise InstallError(
                f"cannot open the install lock {self.path} of {self.what}: {exc}"
            ) from exc
        try:
            poll = POLL_FIRST_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                waited = time.monotonic() - started
                if waited >= timeout_s:
                    raise InstallError(self._timeout_message(fd, timeout_s))
                await asyncio.sleep(min(poll, max(timeout_s - waited, 0.0)))
                poll = min(poll * 2, POLL_MAX_S)
            self._fd = fd
            try:
                yield time.monotonic() - started
            finally:
                self._fd = None
                # Unlock explicitly: a child forked meanwhile shares the open file and would
                # otherwise keep the lock until it exits.
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _open(self) -> int:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(f"{directory} is not a directory owned by uid {os.getuid()}")
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(self.path, flags, 0o600)

    def _timeout_message(self, fd: int, timeout_s: float) -> str:
        holders = _flock_holders(fd)
        by = f" (held by pid {', '.join(map(str, holders))})" if holders else ""
        return (
            f"timed out after {timeout_s:g} s waiting for another process's install into "
            f"{self.what}: the install lock {self.path} is still taken{by}"
        )


def _flock_holders(fd: int) -> list[int]:
    """Pids holding a flock on ``fd``'s file, from ``/proc/locks`` (best effort)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters have "->" before FLOCK.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            with contextlib.suppress(ValueError):
                pids.append(int(fields[4]))
    return pids
