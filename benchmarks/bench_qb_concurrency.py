"""A deployed queue worker running the concurrency the user set: ``Endpoint(max_concurrency=4)``.

A real ``flash build`` of ``tests/deployed_app`` (``naps.py``: ``nap_async`` and the plain
``nap_sync``, both ``max_concurrency=4``) served by real ``flashrt-qb`` workers on the fake control
plane, ``FLASHRT_QB_CONCURRENCY`` unset: the window comes from the manifest. Four jobs of 1 s are
queued at once; the drain (first queued -> last job-done, as the fake recorded them) is set against
the ideal, one job's 1 s: four at once take as long as one. Both workers run side by side and are
measured in alternating rounds (medians), so a slow minute hits both alike.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ROUNDS = 5
JOBS = 4
SLEEP_S = 1.0


def _can_build() -> bool:
    from runpod_flash.core.resources.constants import SUPPORTED_PYTHON_VERSIONS

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version in SUPPORTED_PYTHON_VERSIONS:
        return True
    print(f"   skipped: runpod-flash's `flash build` does not support Python {version}")
    return False


def _drain(fake: Any, endpoint: str) -> float:
    """Seconds from the first of ``JOBS`` jobs queued at once to the last one's job-done."""
    ids = [fake.submit(endpoint, {"seconds": SLEEP_S}) for _ in range(JOBS)]
    done = fake.wait_all(ids, 120)
    assert all(d["status"] == "COMPLETED" for d in done), done
    with fake.cond:
        jobs = [fake.jobs[i] for i in ids]
        return max(j.finished for j in jobs) - min(j.created for j in jobs)


def _drains() -> dict[str, float]:
    from e2e_support import WorkerProcess, flash_build, qb_worker_env
    from fake_runpod import FakeRunPod

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-qbc-")))
        artifact = flash_build(TESTS / "deployed_app", tmp)
        fake = stack.enter_context(FakeRunPod())
        for resource in ("nap_async", "nap_sync"):
            (tmp / resource).mkdir()
            env = qb_worker_env(
                fake,
                resource,
                tmp / resource,
                FLASH_RESOURCE_NAME=resource,
                FLASH_BUILD_ARTIFACT_PATH=str(artifact),
            )
            worker = WorkerProcess(
                [sys.executable, "-m", "flashrt_qb"], env, tmp / f"{resource}.log", tmp
            )
            stack.callback(worker.stop)
        for resource in ("nap_async", "nap_sync"):  # warm: start-up done, window read
            fake.wait(fake.submit(resource, {"seconds": 0}), 120)
        samples: dict[str, list[float]] = {"nap_async": [], "nap_sync": []}
        for _ in range(ROUNDS):
            for resource, drains in samples.items():
                drains.append(_drain(fake, resource))
        return {resource: statistics.median(drains) for resource, drains in samples.items()}


def run() -> list[dict[str, Any]]:
    if not _can_build():
        return []
    drains = _drains()
    kinds = {"nap_async": "async def", "nap_sync": "plain def"}
    return [
        {
            "name": f"qb deployed max_concurrency=4, {JOBS} {kinds[resource]} jobs of 1 s: "
            "drain (floor: one job's 1 s)",
            "value": drain,
            "unit": "s",
            "floor": SLEEP_S,
            "ratio": drain / SLEEP_S,
        }
        for resource, drain in drains.items()
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
