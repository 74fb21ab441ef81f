"""The queue worker: cold start, warm per-job overhead, and draining a burst through the job loop.

* Cold start: spawn ``python -m flashrt_qb --test_input <fixture 01>`` until the SDK prints the
  job's result, against ``python -c "import runpod"`` measured in the same run (the floor: no
  worker on the runpod SDK starts faster than importing it). Once as shipped, once with
  ``FLASHRT_QB_FAST_SDK_IMPORT=0`` (py-cpuinfo's 1 s probe left in).
* Warm per-job overhead: ``await worker.handler(job)`` on the loop the production job loop runs
  on (the runtime's: that is where the SDK calls it) against ``Runtime.execute`` alone on that
  loop, same trivial request.
* Through the job loop, on the fake control plane: a burst of 20 trivial jobs queued at once,
  drained by a real worker at concurrency 1 and 4 (with the peak of jobs it held), then
  one-at-a-time jobs (the next queued when the last one's result is in): median submit ->
  result, and the median job-take -> job-done time the fake recorded (the per-job overhead: the
  function takes microseconds). The floor of all three is the fake's own: a bare aiohttp client
  in the benchmark process doing job-take -> job-done and nothing else. The bare client and
  both workers run side by side, measured in alternating rounds (medians of all rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ROUNDS = 3
WARM_N = 2000
BURST = 20
SEQUENTIAL = 30


def _body(name: str) -> dict[str, Any]:
    from e2e_support import fixture_bodies

    return fixture_bodies(name)[0]


def _spawn_until(argv: list[str], env: dict[str, str], marker: str | None) -> float:
    """Seconds from spawn until ``marker`` is printed (or the process exits, without one)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen = None
    for line in proc.stdout:
        if marker is not None and marker in line and seen is None:
            seen = time.perf_counter() - start
    proc.wait(120)
    if marker is None:
        return time.perf_counter() - start
    assert seen is not None and proc.returncode == 0, f"{argv[:3]} exited {proc.returncode}"
    return seen


def _cold_rows() -> list[dict[str, Any]]:
    from e2e_support import clean_env

    job = json.dumps(_body("01"))
    worker = [sys.executable, "-m", "flashrt_qb", "--test_input", job]
    floor_argv = [sys.executable, "-c", "import runpod"]
    env = clean_env(FLASHRT_VOLUME_DIR="/nonexistent-volume")
    slow_env = dict(env, FLASHRT_QB_FAST_SDK_IMPORT="0")
    samples: dict[str, list[float]] = {"fast": [], "slow": [], "floor": [], "floor_fast": []}
    fast_import = (
        "from flashrt_qb.sdk import import_serverless; import_serverless(True); import runpod"
    )
    for _ in range(ROUNDS):  # interleaved, so a busy moment hits all alike
        samples["floor"].append(_spawn_until(floor_argv, env, None))
        samples["floor_fast"].append(_spawn_until([sys.executable, "-c", fast_import], env, None))
        samples["fast"].append(_spawn_until(worker, env, "Job result:"))
        samples["slow"].append(_spawn_until(worker, slow_env, "Job result:"))
    med = {k: statistics.median(v) for k, v in samples.items()}
    floor = med["floor"]
    return [
        {
            "name": "qb cold start: spawn -> first result (--test_input)",
            "value": med["fast"],
            "unit": "s",
            "floor": floor,
            "ratio": med["fast"] / floor,
        },
        {
            "name": "qb cold start, FLASHRT_QB_FAST_SDK_IMPORT=0",
            "value": med["slow"],
            "unit": "s",
            "floor": floor,
            "ratio": med["slow"] / floor,
        },
        {
            "name": "import runpod with the cpuinfo shortcut (vs plain import)",
            "value": med["floor_fast"],
            "unit": "s",
            "floor": floor,
            "ratio": med["floor_fast"] / floor,
        },
    ]


def _warm_rows() -> list[dict[str, Any]]:
    from flashrt_core.settings import Settings
    from flashrt_qb.settings import QBSettings
    from flashrt_qb.worker import QueueWorker

    body = _body("01")["input"]
    silent = dict(body, function_code=body["function_code"].replace("print(", "str("))
    worker = QueueWorker(Settings(disable_plugin_autoload=True), QBSettings(concurrency=1))
    worker.begin()
    try:

        async def through_handler() -> float:
            for i in range(200):
                await worker.handler({"id": f"w{i}", "input": silent})
            best = float("inf")
            for _ in range(ROUNDS):
                start = time.perf_counter()
                for i in range(WARM_N):
                    await worker.handler({"id": f"j{i}", "input": silent})
                best = min(best, (time.perf_counter() - start) / WARM_N * 1e6)
            return best

        async def execute_alone() -> float:
            runtime = worker.runtime
            assert runtime is not None
            for _ in range(200):
                await runtime.execute(silent)
            best = float("inf")
            for _ in range(ROUNDS):
                start = time.perf_counter()
                for _ in range(WARM_N):
                    await runtime.execute(silent)
                best = min(best, (time.perf_counter() - start) / WARM_N * 1e6)
            return best

        handler_us = worker.loop.submit(through_handler()).result(300)
        execute_us = worker.loop.submit(execute_alone()).result(300)
    finally:
        worker.close()
    return [
        {
            "name": "qb warm job through the handler (vs Runtime.execute alone)",
            "value": handler_us,
            "unit": "us",
            "floor": execute_us,
            "ratio": handler_us / execute_us,
        }
    ]


class _BareTaker:
    """The fake's own floor: one aiohttp client doing job-take -> job-done and nothing else."""

    def __init__(self, fake: Any, endpoint: str) -> None:
        env = fake.worker_env(endpoint, "bare")
        self.take = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "bare") + "&job_in_progress=0"
        self.done = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "bare")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._loop(),), daemon=True)

    async def _loop(self) -> None:
        import aiohttp

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                async with session.get(self.take) as response:
                    if response.status != 200:
                        continue
                    job = await response.json()
                url = self.done.replace("$ID", job["id"]) + "&isStream=false"
                body = json.dumps({"output": {"json_result": 50}})
                async with session.post(url, data=body, headers=form) as response:
                    await response.text()

    def __enter__(self) -> _BareTaker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _measure(fake: Any, endpoint: str, worker_id: str) -> dict[str, Any]:
    """Drain of a burst, then one-at-a-time jobs, on a warm taker of ``endpoint``."""
    body = _body("07")["input"]
    fake.wait(fake.submit(endpoint, body), 60)  # warm: the first request compiles the code
    start = time.perf_counter()
    ids = [fake.submit(endpoint, body) for _ in range(BURST)]
    done = fake.wait_all(ids, 120)
    drain = time.perf_counter() - start
    latencies, overheads = [], []
    for _ in range(SEQUENTIAL):
        start = time.perf_counter()
        job_id = fake.submit(endpoint, body)
        done.append(fake.wait(job_id, 60))
        latencies.append(time.perf_counter() - start)
        with fake.cond:
            job = fake.jobs[job_id]
            overheads.append(job.done_at - job.taken_at)
    assert all(d["status"] == "COMPLETED" for d in done), done
    return {
        "drain": drain,
        "held": fake.held_peak(worker_id),
        "latencies": latencies,
        "overheads": overheads,
    }


def _started_worker(stack: contextlib.ExitStack, concurrency: int, workdir: Path) -> _Taker:
    from e2e_support import WorkerProcess, qb_worker_env, worker_id_of
    from fake_runpod import FakeRunPod

    endpoint = f"bench-c{concurrency}"
    extra = {"FLASHRT_QB_CONCURRENCY": str(concurrency), "FLASHRT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    fake = stack.enter_context(FakeRunPod())
    env = qb_worker_env(fake, endpoint, workdir, **extra)
    worker = WorkerProcess(
        [sys.executable, "-m", "flashrt_qb"], env, workdir / f"{endpoint}.log", workdir
    )
    stack.callback(worker.stop)
    fake.wait_for(lambda f: bool(f.takes), 90)
    return _Taker(fake, endpoint, worker_id_of(endpoint))


class _Taker:
    """A fake control plane and who takes its jobs: a worker, or the bare client."""

    def __init__(self, fake: Any, endpoint: str, worker_id: str) -> None:
        self.fake = fake
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.drains: list[float] = []
        self.latencies: list[float] = []
        self.overheads: list[float] = []
        self.held = 0.0

    def measure(self) -> None:
        figures = _measure(self.fake, self.endpoint, self.worker_id)
        self.drains.append(figures["drain"])
        self.latencies.extend(figures["latencies"])
        self.overheads.extend(figures["overheads"])
        self.held = max(self.held, figures["held"])

    def figures(self) -> dict[str, float]:
        return {
            "drain": statistics.median(self.drains),
            "held": self.held,
            "latency": statistics.median(self.latencies),
            "overhead": statistics.median(self.overheads),
        }


def _burst_figures() -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """The bare client's figures and each worker's; all run side by side (an idle taker waits
    in a long poll), measured in alternating rounds, so a slow minute hits all alike."""
    import tempfile

    from fake_runpod import FakeRunPod

    with contextlib.ExitStack() as stack:
        floor_fake = stack.enter_context(FakeRunPod())
        stack.enter_context(_BareTaker(floor_fake, "bench-floor"))
        floor = _Taker(floor_fake, "bench-floor", "bare")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-qb-")))
        workers = {c: _started_worker(stack, c, tmp) for c in (1, 4)}
        for _ in range(ROUNDS):
            for taker in (floor, *workers.values()):
                taker.measure()
        return floor.figures(), {c: taker.figures() for c, taker in workers.items()}


def _row(name: str, ours: float, floor: float, unit: str, scale: float = 1.0) -> dict[str, Any]:
    return {
        "name": name,
        "value": ours * scale,
        "unit": unit,
        "floor": floor * scale,
        "ratio": ours / floor,
    }


def _burst_rows() -> list[dict[str, Any]]:
    floor, figures = _burst_figures()
    rows = [
        _row(
            f"qb burst of {BURST} trivial jobs, concurrency {c}: drain (peak held "
            f"{ours['held']:g}; floor: a bare take/done client)",
            ours["drain"],
            floor["drain"],
            "s",
        )
        for c, ours in figures.items()
    ]
    one = figures[1]
    rows.append(
        _row(
            "qb one-at-a-time jobs, concurrency 1: submit -> result (floor: bare client)",
            one["latency"],
            floor["latency"],
            "ms",
            1000,
        )
    )
    rows.append(
        _row(
            "qb per-job overhead p50: job-take -> job-done of a trivial job (floor: bare)",
            one["overhead"],
            floor["overhead"],
            "ms",
            1000,
        )
    )
    return rows


def run() -> list[dict[str, Any]]:
    os.environ.setdefault("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")
    return [*_cold_rows(), *_warm_rows(), *_burst_rows()]


if __name__ == "__main__":
    for row in run():
        print(row)
