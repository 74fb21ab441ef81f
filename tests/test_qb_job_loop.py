"""The queue worker's job loop against the fake control plane: no hoarding, faults, drain.

Each test runs a real ``flashrt-qb`` process (the runpod SDK's requests, heartbeat and stop
channel under :mod:`flashrt_qb.job_loop`). The fake records when every job was taken and when
its job-done came, so "held" (taken, not done) is read off the platform's side.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from typing import TYPE_CHECKING

import pytest
from e2e_support import (
    SLEEPER,
    fixture_bodies,
    json_request,
    start_qb_worker,
    wait_until,
    wait_written,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from e2e_support import RunningWorker, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow

BURST = 20


def _worker(
    spawn_worker: Callable[..., WorkerProcess],
    fake: FakeRunPod,
    name: str,
    tmp: Path,
    **extra: str,
) -> RunningWorker:
    worker = start_qb_worker(
        spawn_worker, fake, name, tmp, FLASHRT_DISABLE_PLUGIN_AUTOLOAD="1", **extra
    )
    worker.wait_polling()
    return worker


def _trivial() -> dict[str, object]:
    return dict(fixture_bodies("07")[0]["input"])


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_burst_finishes_and_the_worker_never_holds_more_than_it_runs(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    concurrency: int,
) -> None:
    worker = _worker(
        spawn_worker,
        fake_runpod,
        f"ep-qb-burst-c{concurrency}",
        tmp_path,
        FLASHRT_QB_CONCURRENCY=str(concurrency),
    )
    ids = [fake_runpod.submit(worker.endpoint, _trivial()) for _ in range(BURST)]

    done = fake_runpod.wait_all(ids, 120)

    assert [d["status"] for d in done] == ["COMPLETED"] * BURST, done
    assert all(d["output"]["json_result"] == 50 for d in done)
    assert fake_runpod.held_peak(worker.worker_id) <= concurrency
    with fake_runpod.cond:
        assert fake_runpod.takes_open_peak[worker.worker_id] == 1  # one take at a time
        assert all(fake_runpod.jobs[i].done_posts == 1 for i in ids)


def test_cancelling_a_running_and_a_queued_job(
    fake_runpod: FakeRunPod, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = _worker(spawn_worker, fake_runpod, "ep-qb-cancel", tmp_path)
    marker = tmp_path / "running"
    running = fake_runpod.submit(worker.endpoint, json_request("sleeper", SLEEPER, str(marker), 60))
    wait_until((tmp_path / "running.started").exists, 60, "the first job to start")
    queued = fake_runpod.submit(worker.endpoint, json_request("sleeper", SLEEPER, "unused", 0))
    # Concurrency 1 and nothing prefetched: the second job stays in the platform's queue.
    with fake_runpod.cond:
        assert fake_runpod.jobs[queued].status == "IN_QUEUE"

    assert fake_runpod.cancel(queued)["status"] == "CANCELLED"
    assert fake_runpod.cancel(running)["status"] == "CANCELLED"

    assert wait_written(marker, 30, "the running job to see its cancellation") == "cancelled"
    assert worker.run(_trivial())["status"] == "COMPLETED"  # the freed slot takes the next job
    with fake_runpod.cond:
        assert fake_runpod.jobs[queued].worker_id is None  # never handed out
    assert fake_runpod.held_peak(worker.worker_id) <= 1


def test_sigterm_mid_burst_finishes_the_running_job_and_loses_no_taken_job(
    fake_runpod: FakeRunPod, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = _worker(spawn_worker, fake_runpod, "ep-qb-drain", tmp_path)
    ids = [
        fake_runpod.submit(
            worker.endpoint, json_request("sleeper", SLEEPER, str(tmp_path / f"j{i}"), 0.5)
        )
        for i in range(6)
    ]
    wait_until((tmp_path / "j1.started").exists, 60, "the burst to be running")

    worker.process.proc.send_signal(signal.SIGTERM)

    assert worker.process.proc.wait(60) == 0
    with fake_runpod.cond:
        jobs = [fake_runpod.jobs[i] for i in ids]
    taken = [j for j in jobs if j.taken_at is not None]
    assert len(taken) >= 2
    assert all(j.status == "COMPLETED" and j.done_posts == 1 for j in taken), taken
    assert all(j.status == "IN_QUEUE" for j in jobs if j.taken_at is None)
    for job_id in ids:  # leave nothing queued on the shared fake
        fake_runpod.cancel(job_id)


def _takes(fake: FakeRunPod, worker: str) -> list[dict[str, object]]:
    with fake.cond:
        return [t for t in fake.takes if t["worker"] == worker]


def _wait_faults(fake: FakeRunPod, worker: str, count: int) -> None:
    """Until ``worker``'s job-takes have met ``count`` injected faults (its own take is a long
    poll, so a fault meets the take after the one already waiting)."""
    fake.wait_for(
        lambda f: sum(1 for t in f.takes if t["worker"] == worker and t.get("fault")) >= count,
        60,
    )


def test_a_429_from_job_take_backs_off_then_the_loop_recovers(
    fake_runpod: FakeRunPod, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = _worker(spawn_worker, fake_runpod, "ep-qb-429", tmp_path)
    fake_runpod.inject_take_faults(worker.worker_id, 429)
    _wait_faults(fake_runpod, worker.worker_id, 1)

    assert worker.run(_trivial())["status"] == "COMPLETED"

    takes = _takes(fake_runpod, worker.worker_id)
    at = next(i for i, t in enumerate(takes) if t.get("fault") == 429)
    after = takes[at + 1]
    # The SDK's pause after a 429 is 5 s; the next take waited it out (a lower bound only).
    assert float(after["t"]) - float(takes[at]["t"]) >= 4.5  # type: ignore[arg-type]


def test_job_take_errors_and_hangs_do_not_stop_the_loop(
    fake_runpod: FakeRunPod, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = _worker(
        spawn_worker, fake_runpod, "ep-qb-faults", tmp_path, FLASHRT_QB_TAKE_TIMEOUT_S="2"
    )
    fake_runpod.inject_take_faults(worker.worker_id, 500, 502, "hang", 404)
    _wait_faults(fake_runpod, worker.worker_id, 4)

    assert worker.run(_trivial())["status"] == "COMPLETED"
    faults = [t.get("fault") for t in _takes(fake_runpod, worker.worker_id) if t.get("fault")]
    assert faults == [500, 502, "hang", 404]


# runpod-flash's own pattern for a platform log line (core/resources/request_logs.py).
ISO_PREFIX = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}) ")


def test_the_fake_hapi_serves_the_worker_processs_output_lines(
    fake_runpod: FakeRunPod, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = _worker(spawn_worker, fake_runpod, "ep-qb-logs", tmp_path)
    url = f"{fake_runpod.base_url}/v1/pod/{worker.worker_id}/logs"

    def served() -> list[str]:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["system"] == []
        lines: list[str] = body["container"]
        return lines

    wait_until(lambda: any("ready: live mode" in line for line in served()), 60, "the ready line")
    lines = served()
    assert any("--- Starting Serverless Worker" in line for line in lines)
    assert all(ISO_PREFIX.match(line) for line in lines), lines[:5]
    printed = [ISO_PREFIX.sub("", line) for line in lines]
    assert printed == worker.process.log().splitlines()[: len(printed)]
