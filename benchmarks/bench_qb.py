"""The queue worker: cold start, warm per-job overhead, and draining a burst through the job loop.

* Cold start: spawn ``python -m flashrt_qb --test_input <fixture 01>`` until the SDK prints the
  job's result, against ``python -c "import runpod"`` measured in the same run (the floor: no
  worker on the runpod SDK starts faster than importing it). Once as shipped, once with
  ``FLASHRT_QB_FAST_SDK_IMPORT=0`` (py-cpuinfo's 1 s probe left in).
* Warm per-job overhead: ``await worker.handler(job)`` from another thread's loop (as the SDK
  calls it) against ``Runtime.execute`` alone on the runtime's loop, same trivial request.
* Burst: 20 trivial jobs queued at once on the fake control plane, drained by a real worker in
  the SDK's production loop, at concurrency 1 and 4; the floor is the same worker taking only
  what it can run (``FLASHRT_QB_PREFETCH=0``, how the plain SDK is used).
* One at a time: the next job is queued when the last one's result is in (how a client calls a
  remote function in a loop); median submit -> result, against the same floor.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
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
SEQUENTIAL = 8


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

        handler_us = asyncio.run(through_handler())
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


def _drain(concurrency: int, prefetch: int | None, workdir: Path) -> float:
    return _through_loop(concurrency, prefetch, workdir, sequential=False)


def _through_loop(
    concurrency: int, prefetch: int | None, workdir: Path, *, sequential: bool
) -> float:
    """A burst's drain time, or (``sequential``) the median latency of one-at-a-time jobs."""
    from e2e_support import WorkerProcess, qb_worker_env
    from fake_runpod import FakeRunPod

    body = _body("07")["input"]
    endpoint = f"bench-c{concurrency}-p{prefetch}"
    extra = {"FLASHRT_QB_CONCURRENCY": str(concurrency)}
    if prefetch is not None:
        extra["FLASHRT_QB_PREFETCH"] = str(prefetch)
    with FakeRunPod() as fake:
        env = qb_worker_env(fake, endpoint, workdir, **extra)
        worker = WorkerProcess(
            [sys.executable, "-m", "flashrt_qb"], env, workdir / f"{endpoint}.log", workdir
        )
        try:
            fake.wait_for(lambda f: bool(f.takes), 90)
            fake.wait(fake.submit(endpoint, body), 60)  # warm: first request compiles the code
            if sequential:
                latencies = []
                for _ in range(SEQUENTIAL):
                    start = time.perf_counter()
                    done = [fake.wait(fake.submit(endpoint, body), 60)]
                    latencies.append(time.perf_counter() - start)
                elapsed = statistics.median(latencies)
            else:
                start = time.perf_counter()
                ids = [fake.submit(endpoint, body) for _ in range(BURST)]
                done = fake.wait_all(ids, 120)
                elapsed = time.perf_counter() - start
        finally:
            worker.stop()
    assert all(d["status"] == "COMPLETED" for d in done)
    return elapsed


def _burst_rows() -> list[dict[str, Any]]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-qb-") as tmp:
        for concurrency in (1, 4):
            plain = _drain(concurrency, 0, Path(tmp))
            ours = _drain(concurrency, None, Path(tmp))
            rows.append(
                {
                    "name": f"qb burst of {BURST} trivial jobs, concurrency {concurrency}: drain",
                    "value": ours,
                    "unit": "s",
                    "floor": plain,
                    "ratio": ours / plain,
                }
            )
        plain = _through_loop(1, 0, Path(tmp), sequential=True)
        ours = _through_loop(1, None, Path(tmp), sequential=True)
        rows.append(
            {
                "name": "qb one-at-a-time jobs, concurrency 1: submit -> result",
                "value": ours,
                "unit": "s",
                "floor": plain,
                "ratio": ours / plain,
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    os.environ.setdefault("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")
    return [*_cold_rows(), *_warm_rows(), *_burst_rows()]


if __name__ == "__main__":
    for row in run():
        print(row)
