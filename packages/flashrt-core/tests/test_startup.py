"""The start-up bound: one deadline over several steps, a thread abandoned, the caller's cancel."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from flashrt_core.lanes import Lanes
from flashrt_core.startup import StartupBound, StartupTimeout

log = logging.getLogger("flashrt.test")


def test_steps_share_one_deadline_and_a_stuck_thread_is_left_behind() -> None:
    release = threading.Event()
    lanes = Lanes(2)

    async def main() -> tuple[int, float]:
        bound = StartupBound(0.6, 0, log)
        first = await bound.step("a quick step", asyncio.sleep(0.3, result=7))
        began = time.monotonic()
        with pytest.raises(
            StartupTimeout, match=r"within 0\.6 s .*: still a stuck import, for 0 s"
        ):
            await bound.step("a stuck import", lanes.run_blocking(release.wait))
        return first, time.monotonic() - began

    try:
        first, waited = asyncio.run(main())
        assert first == 7
        assert waited < 0.5  # what the first step used is not given again to the second
    finally:
        release.set()
        lanes.shutdown()


def test_progress_lines_name_the_step_and_a_step_in_time_is_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "flashrt.test")

    async def main() -> str:
        return await StartupBound(0, 0.1, log).step("loading", asyncio.sleep(0.35, result="ok"))

    assert asyncio.run(main()) == "ok"
    lines = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(lines) == 3, lines
    assert lines[0].endswith(": loading, for 0 s (limit: none)")


def test_cancelling_the_caller_cancels_the_step() -> None:
    cancelled = asyncio.Event()

    async def step() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        waiter = asyncio.create_task(StartupBound(30, 0, log).step("a step", step()))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(main())
