"""The cross-process install lock: bounded waits that name the lock, release on every path, and
the stamp another process's install changes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from flashrt_installers.lockfile import InstallLock
from flashrt_installers.proc import InstallError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold ``path``'s flock through a descriptor of its own (it conflicts even in-process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def open_fds(path: Path) -> int:
    """Descriptors this process holds on ``path`` (not all of them: what other tests left to
    the garbage collector closes its own now and then)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_a_lock_kept_past_the_limit_fails_naming_the_file_and_its_holder(tmp_path: Path) -> None:
    lock = InstallLock.for_key("python", "/some/env", "the Python environment /some/env", tmp_path)
    assert lock.path.parent == tmp_path and lock.path.name.startswith("python-")

    async def take() -> None:
        async with lock.hold(0.3):
            pytest.fail("the lock was taken while another descriptor held it")

    fds = open_fds(lock.path)
    with held(lock.path):
        started = time.monotonic()
        with pytest.raises(InstallError) as caught:
            asyncio.run(take())
        waited = time.monotonic() - started
    assert 0.3 <= waited < 3
    message = str(caught.value)
    assert message.startswith(
        "timed out after 0.3 s waiting for another process's install into "
        "the Python environment /some/env: the install lock "
    )
    assert str(lock.path) in message and f"held by pid {os.getpid()}" in message
    assert open_fds(lock.path) == fds


def test_released_after_an_error_and_when_a_waiter_is_cancelled(tmp_path: Path) -> None:
    lock = InstallLock(tmp_path / "x.lock", "something")
    fds = open_fds(lock.path)

    async def failing() -> None:
        async with lock.hold(5):
            assert not free(lock.path) and open_fds(lock.path) == fds + 1
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(failing())
    assert free(lock.path) and open_fds(lock.path) == fds

    async def cancelled_waiter() -> None:
        async def wait() -> None:
            async with lock.hold(30):
                pytest.fail("taken while held")

        task = asyncio.ensure_future(wait())
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with held(lock.path):
        asyncio.run(cancelled_waiter())
    assert free(lock.path) and open_fds(lock.path) == fds


def test_a_file_that_cannot_be_opened_is_an_install_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    lock = InstallLock(tmp_path / "not-a-dir" / "x.lock", "the Python environment /e")

    async def take() -> None:
        async with lock.hold(1):
            pass

    with pytest.raises(InstallError, match=r"cannot open the install lock .*not-a-dir/x\.lock"):
        asyncio.run(take())


def test_another_process_holding_it_is_waited_for_and_its_install_changes_the_stamp(
    tmp_path: Path,
) -> None:
    lock = InstallLock(tmp_path / "env.lock", "the Python environment /e")
    ready = tmp_path / "ready"
    holder = textwrap.dedent(
        f"""
        import asyncio, pathlib, time
        from flashrt_installers.lockfile import InstallLock

        async def main():
            lock = InstallLock(pathlib.Path({str(lock.path)!r}), "x")
            async with lock.hold(10):
                pathlib.Path({str(ready)!r}).touch()
                time.sleep(0.5)
                lock.bump()

        asyncio.run(main())
        """
    )
    before = lock.stamp()
    child = subprocess.Popen([sys.executable, "-c", holder])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)

        async def take() -> float:
            async with lock.hold(20) as waited:
                return waited

        waited = asyncio.run(take())
    finally:
        child.wait(timeout=30)
    assert child.returncode == 0
    assert waited > 0.2  # it waited for the other process to let go
    after = lock.stamp()
    assert after is not None and after != before and after[2] == 1  # one install: one byte
