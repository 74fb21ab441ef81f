"""``Readiness``: a shell's start-up is starting, then ready or failed with a reason, never back.

The shells' own tests check what the platform sees of it (``/ping``, job answers); these pin the
transitions and the reasons themselves.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from flashrt_core.readiness import Readiness, StartupFailed

log = logging.getLogger("flashrt.test-readiness")


class AppError(Exception):
    """A shell's own failure whose message is the whole reason."""


def _run_to_end(readiness: Readiness, start: object) -> None:
    async def scenario() -> None:
        readiness.begin(start)  # type: ignore[arg-type]
        assert await readiness.wait() == readiness.reason

    asyncio.run(scenario())


def test_a_start_up_that_returns_is_ready_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, log.name)
    readiness = Readiness(log)
    calls: list[int] = []

    async def start() -> str:
        calls.append(1)
        assert readiness.phase == "starting"
        return "live mode"

    async def scenario() -> None:
        first = readiness.begin(start)
        assert readiness.begin(start) is first  # once
        assert await readiness.wait(5) is None

    asyncio.run(scenario())
    assert (readiness.phase, readiness.reason, calls) == ("ready", None, [1])
    assert "ready: live mode" in caplog.text


@pytest.mark.parametrize(
    ("error", "reason", "left_running"),
    [
        (StartupFailed("deployed app 'x' unavailable: no artifact"), "deployed app 'x' ", False),
        (
            StartupFailed("still importing app.py", left_running=True),
            "still importing app.py",
            True,
        ),
        (AppError("app.py has no variable 'app'"), "app.py has no variable 'app'", False),
        (ValueError("bad value"), "start-up failed: ValueError: bad value", False),
    ],
)
def test_a_start_up_that_raises_fails_with_a_reason(
    error: Exception, reason: str, left_running: bool, caplog: pytest.LogCaptureFixture
) -> None:
    readiness = Readiness(log, reasons=(AppError,))

    async def start() -> str:
        raise error

    _run_to_end(readiness, start)
    assert readiness.phase == "failed"
    assert readiness.reason is not None and readiness.reason.startswith(reason)
    assert readiness.left_running is left_running
    assert f"not ready: {readiness.reason}" in caplog.text


def test_a_wait_that_runs_out_says_what_is_still_starting() -> None:
    readiness = Readiness(log)

    async def scenario() -> tuple[str | None, str | None]:
        release = asyncio.Event()

        async def start() -> str:
            readiness.doing("importing handler_x.py")
            await release.wait()
            return "deployed mode"

        readiness.begin(start)
        early = await readiness.wait(0.05)
        assert readiness.phase == "starting"
        release.set()
        return early, await readiness.wait(5)

    early, later = asyncio.run(scenario())
    assert early == "worker start-up has not finished after 0.05 s: still importing handler_x.py"
    assert later is None and readiness.phase == "ready"


@pytest.mark.parametrize("started", [True, False], ids=["running", "not-yet-running"])
def test_stopping_an_unfinished_start_up_fails_it_and_it_stays_failed(started: bool) -> None:
    readiness = Readiness(log)

    async def scenario() -> str | None:
        async def start() -> str:
            await asyncio.Event().wait()  # never finishes
            return "never"

        readiness.begin(start)
        if started:
            await asyncio.sleep(0.01)
        await readiness.stop()
        return await readiness.wait(1)

    reason = asyncio.run(scenario())
    assert reason == "start-up was cancelled (the worker is stopping)"
    assert readiness.phase == "failed" and readiness.reason == reason
