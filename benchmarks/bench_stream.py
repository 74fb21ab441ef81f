"""A deployed generator's stream: how long an item takes from its ``yield`` to the platform.

A real ``flash build`` of ``tests/deployed_app`` is served by real ``flashrt-qb`` workers (the
``stream_worker`` resource, a sync generator) against the fake control plane: one with the
generator in the executor process (the default), one in-process (``FLASHRT_ISOLATION=none``).
Each job yields items stamped with ``time.monotonic()`` as they are yielded (one clock for every
process of the machine), and the fake records when each reached its stream endpoint. The
figure is the first item's delay, yield -> arrival (median over the jobs), and the p90 of
every item's; the floor is a bare aiohttp client in the benchmark process that stamps an
item and posts it to the same endpoint. The takers run side by side, measured in alternating
rounds. Target: the first item within 50 ms of its yield.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ROUNDS = 3
JOBS = 10  # per round and taker
ITEMS = 3
PAUSE_S = 0.02


class _Stream:
    """A worker of the stream resource and the delays it showed."""

    def __init__(self, fake: Any, endpoint: str) -> None:
        self.fake = fake
        self.endpoint = endpoint
        self.first: list[float] = []
        self.every: list[float] = []

    def measure(self) -> None:
        job_input = {"n": ITEMS, "pause": PAUSE_S, "stamp": True}
        for _ in range(JOBS):
            job_id = self.fake.submit(self.endpoint, job_input)
            status = self.fake.wait(job_id, 60)
            assert status["status"] == "COMPLETED", status
            with self.fake.cond:
                job = self.fake.jobs[job_id]
                delays = [
                    at - item["t"] for item, at in zip(job.stream, job.stream_at, strict=True)
                ]
            assert len(delays) == ITEMS, job.stream
            self.first.append(delays[0])
            self.every.extend(delays)


class _BarePoster:
    """The floor: stamp an item, post it to the fake's stream endpoint, nothing else."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        env = fake.worker_env("bench-stream-floor", "bare")
        self.job_id = fake.submit("bench-stream-floor", {})  # never taken: only its stream
        self.url = (
            env["RUNPOD_WEBHOOK_POST_STREAM"]
            .replace("$RUNPOD_POD_ID", "bare")
            .replace("$ID", self.job_id)
        ) + "&isStream=false"
        self.first: list[float] = []
        self.every: list[float] = []

    def measure(self) -> None:
        asyncio.run(self._posts())

    async def _posts(self) -> None:
        import json

        import aiohttp

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with aiohttp.ClientSession() as session:
            for _ in range(JOBS):
                with self.fake.cond:
                    seen = len(self.fake.jobs[self.job_id].stream)
                for i in range(ITEMS):
                    if i:
                        await asyncio.sleep(PAUSE_S)
                    body = json.dumps({"output": {"i": i, "t": time.monotonic()}})
                    async with session.post(self.url, data=body, headers=form) as response:
                        await response.read()
                with self.fake.cond:
                    job = self.fake.jobs[self.job_id]
                    delays = [
                        at - item["t"]
                        for item, at in zip(job.stream[seen:], job.stream_at[seen:], strict=True)
                    ]
                self.first.append(delays[0])
                self.every.extend(delays)


def _started(stack: contextlib.ExitStack, artifact: Path, workdir: Path, **extra: str) -> Any:
    from e2e_support import WorkerProcess, qb_worker_env
    from fake_runpod import FakeRunPod

    name = "inprocess" if extra else "executor"
    endpoint = f"bench-stream-{name}"
    fake = stack.enter_context(FakeRunPod())
    env = qb_worker_env(
        fake,
        endpoint,
        workdir / name,
        FLASH_RESOURCE_NAME="stream_worker",
        FLASH_BUILD_ARTIFACT_PATH=str(artifact),
        FLASHRT_DISABLE_VOLUME_CACHE="1",
        **extra,
    )
    worker = WorkerProcess(
        [sys.executable, "-m", "flashrt_qb"], env, workdir / f"{endpoint}.log", workdir
    )
    stack.callback(worker.stop)
    fake.wait_for(lambda f: bool(f.takes), 90)
    fake.wait(fake.submit(endpoint, {"n": 1, "pause": 0}), 120)  # warm: start-up done
    return _Stream(fake, endpoint)


def _ms(values: list[float], q: float = 0.5) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run() -> list[dict[str, Any]]:
    from e2e_support import flash_build
    from fake_runpod import FakeRunPod

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-stream-")))
        artifact = flash_build(TESTS / "deployed_app", tmp)
        floor = _BarePoster(stack.enter_context(FakeRunPod()))
        takers = {
            "executor": _started(stack, artifact, tmp),
            "in-process": _started(stack, artifact, tmp, FLASHRT_ISOLATION="none"),
        }
        for _ in range(ROUNDS):
            floor.measure()
            for taker in takers.values():
                taker.measure()
    rows = []
    for name, taker in takers.items():
        first, floor_first = statistics.median(taker.first), statistics.median(floor.first)
        every, floor_every = _ms(taker.every, 0.9), _ms(floor.every, 0.9)
        rows.append(
            {
                "name": f"qb stream, {name}: first item, yield -> stream (bare post)",
                "value": first * 1000,
                "unit": "ms",
                "floor": floor_first * 1000,
                "ratio": first / floor_first,
            }
        )
        rows.append(
            {
                "name": f"qb stream, {name}: p90 of every item (bare post)",
                "value": every,
                "unit": "ms",
                "floor": floor_every,
                "ratio": every / floor_every,
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
