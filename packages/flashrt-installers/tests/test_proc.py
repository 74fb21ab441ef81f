"""The process runner, real processes: group kill on timeout and cancel, bounded output, retry."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING

import pytest
from flashrt_installers import proc

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the shell, was killed too).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_success_keeps_only_the_tail_of_the_output() -> None:
    code = "import sys\nfor i in range(5000): print('line', i)\nprint('the end', file=sys.stderr)"
    result = asyncio.run(
        proc.run_command([sys.executable, "-c", code], timeout_s=30, tail_bytes=1000)
    )
    assert result.ok and result.returncode == 0
    assert result.output.endswith("the end\n")
    assert result.output.startswith("[... ")
    assert len(result.output) < 1100
    assert "line 4999" in result.output and "line 10\n" not in result.output


def test_python_children_write_unbuffered_unless_told_otherwise(monkeypatch) -> None:
    """pip's stdout must not be held back past its stderr: the tail ends with the error."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    code = "import sys\nprint('progress')\nprint('the error', file=sys.stderr)\nsys.exit(1)"
    result = asyncio.run(proc.run_command([sys.executable, "-c", code], timeout_s=30))
    assert result.returncode == 1
    assert result.output == "progress\nthe error\n"
    probe = "import os; print(os.environ.get('PYTHONUNBUFFERED'))"
    told = asyncio.run(
        proc.run_command(
            [sys.executable, "-c", probe], timeout_s=30, env={**os.environ, "PYTHONUNBUFFERED": ""}
        )
    )
    assert told.output == "\n"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    result = asyncio.run(proc.run_command(["sh", "-c", script], timeout_s=0.5))
    assert result.timed_out and not result.ok and result.returncode is None
    assert _wait_dead(int(pidfile.read_text()))


def test_cancelling_the_caller_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"

    async def main() -> None:
        task = asyncio.ensure_future(proc.run_command(["sh", "-c", script], timeout_s=60))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait_dead(int(pidfile.read_text()))


def test_exit_is_seen_even_when_a_grandchild_keeps_the_pipe_open(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    script = f"(sleep 30 & echo $! > {pidfile}); echo started"
    try:
        start = time.monotonic()
        result = asyncio.run(proc.run_command(["sh", "-c", script], timeout_s=20))
        assert result.ok and "started" in result.output
        assert time.monotonic() - start < 15  # not held until the pipe closes at 30 s
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), 9)


def test_one_retry_on_a_transient_network_failure(tmp_path: Path) -> None:
    marker = tmp_path / "tried"
    script = (
        f"if [ -e {marker} ]; then echo ok; exit 0; fi; touch {marker}; "
        "echo 'error: Temporary failure in name resolution' >&2; exit 1"
    )
    result = asyncio.run(
        proc.run_with_retry(["sh", "-c", script], timeout_s=10, retry_delay_s=0.01)
    )
    assert result.ok and result.attempts == 2 and "ok" in result.output


def test_no_retry_on_an_ordinary_failure() -> None:
    before = proc.STATS.started
    result = asyncio.run(
        proc.run_with_retry(
            ["sh", "-c", "echo 'No matching distribution found for x'; exit 1"],
            timeout_s=10,
            retry_delay_s=0.01,
        )
    )
    assert not result.ok and result.returncode == 1 and result.attempts == 1
    assert proc.STATS.started == before + 1
    message = proc.describe_failure("pip", ["x"], result)
    assert "pip failed with exit code 1" in message and "installing x" in message
    assert "No matching distribution found" in message


def test_a_missing_program_raises_oserror() -> None:
    with pytest.raises(OSError):
        asyncio.run(proc.run_command(["/nonexistent/flashrt-tool"], timeout_s=5))


def test_arguments_are_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    result = asyncio.run(
        proc.run_command(
            [
                sys.executable,
                "-c",
                "import sys; print(sys.argv[1])",
                f"$(touch {target}); `touch {target}`",
            ],
            timeout_s=10,
        )
    )
    assert result.ok and not target.exists()
    assert "$(touch" in result.output
