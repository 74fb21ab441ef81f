"""``flashrt-qb`` as a process: concurrency isolation, bad jobs, cancel, SIGTERM, --test_input.

Jobs are FunctionRequests with plain-JSON arguments (``serialization_format: json``), queued on
the fake control plane and taken by the SDK's production job loop.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from e2e_support import (
    SLEEPER,
    clean_env,
    fixture_bodies,
    json_request,
    start_qb_worker,
    wait_until,
    wait_written,
)
from flashrt_qb.job_result import JOB_DONE_MAX_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from e2e_support import RunningWorker, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow


CHATTY = """\
def chatty(tag, mine, other, rounds):
    import os, time
    open(mine, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(other):  # both jobs are running now
        if time.monotonic() > deadline:
            raise TimeoutError("the other job never started")
        time.sleep(0.01)
    for i in range(rounds):
        print(f"{tag} line {i}")
        time.sleep(0.001)
    return tag
"""


def test_concurrent_jobs_outputs_never_mix(qb_live_worker: RunningWorker, tmp_path: Path) -> None:
    fake = qb_live_worker.fake
    a, b = tmp_path / "a.started", tmp_path / "b.started"
    rounds = 200
    ids = [
        fake.submit(
            qb_live_worker.endpoint, json_request("chatty", CHATTY, "A", str(a), str(b), rounds)
        ),
        fake.submit(
            qb_live_worker.endpoint, json_request("chatty", CHATTY, "B", str(b), str(a), rounds)
        ),
    ]
    first, second = fake.wait_all(ids)

    for done, tag in ((first, "A"), (second, "B")):
        assert done["status"] == "COMPLETED", done
        assert done["output"]["json_result"] == tag
        assert done["output"]["stdout"].splitlines() == [f"{tag} line {i}" for i in range(rounds)]


def test_a_bad_job_fails_clearly_and_the_worker_keeps_serving(
    qb_live_worker: RunningWorker,
) -> None:
    not_an_object = qb_live_worker.run("add(2, 3)")
    assert not_an_object["status"] == "FAILED"
    assert "must be a FunctionRequest object, got str" in not_an_object["error"]

    bad_field = qb_live_worker.run({"function_name": 5, "function_code": "def f(): pass"})
    assert bad_field["status"] == "FAILED"
    assert "function_name" in bad_field["error"]

    good = qb_live_worker.run(fixture_bodies("07")[0]["input"])
    assert good["status"] == "COMPLETED"
    assert good["output"]["json_result"] == 50


def test_cancel_reaches_the_running_user_coroutine(
    qb_live_worker: RunningWorker, tmp_path: Path
) -> None:
    fake = qb_live_worker.fake
    marker = tmp_path / "cancelled"
    job = fake.submit(qb_live_worker.endpoint, json_request("sleeper", SLEEPER, str(marker), 60))
    # Running, not just taken: the SDK ignores a stop for a job still in its local queue.
    wait_until((tmp_path / "cancelled.started").exists, 30, "the job to start")

    assert fake.cancel(job)["status"] == "CANCELLED"

    # The stop channel -> the SDK cancels the job's task -> our handler -> the runtime's task.
    assert wait_written(marker, 30, "the user coroutine to see its cancellation") == "cancelled"
    assert qb_live_worker.run(fixture_bodies("07")[0]["input"])["status"] == "COMPLETED"


BIG = """\
def big(size):
    return "x" * size
"""


@pytest.mark.parametrize("size", [JOB_DONE_MAX_BYTES + 100, 25 * 1024 * 1024])
def test_a_result_over_the_platforms_limit_fails_its_job_at_once(
    qb_live_worker: RunningWorker, size: int
) -> None:
    fake = qb_live_worker.fake
    job = fake.submit(qb_live_worker.endpoint, json_request("big", BIG, size))

    done = fake.wait(job, 60)  # not left IN_PROGRESS until the endpoint's execution timeout

    assert done["status"] == "FAILED"
    error = fake.jobs[job].error
    named = re.search(r"is (\d+) bytes", error)
    assert named is not None and int(named[1]) > size  # the body's size: the value and more
    assert f"over the platform's limit of {JOB_DONE_MAX_BYTES} bytes" in error
    assert "return a URL" in error
    assert fake.jobs[job].done_posts == 1
    assert fake.jobs[job].done_bytes < 64 * 1024
    assert qb_live_worker.run(fixture_bodies("07")[0]["input"])["status"] == "COMPLETED"


def test_a_result_just_under_the_platforms_limit_is_delivered(
    qb_live_worker: RunningWorker,
) -> None:
    fake = qb_live_worker.fake
    size = JOB_DONE_MAX_BYTES - 4096  # room for the response's other fields
    job = fake.submit(qb_live_worker.endpoint, json_request("big", BIG, size))

    done = fake.wait(job, 60)

    assert done["status"] == "COMPLETED", fake.jobs[job].error
    assert JOB_DONE_MAX_BYTES - 4096 < fake.jobs[job].done_bytes <= JOB_DONE_MAX_BYTES
    assert len(done["output"]["json_result"]) == size


def test_sigterm_lets_the_running_job_finish_then_exits(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    worker = start_qb_worker(spawn_worker, fake_runpod, "ep-qb-sigterm", tmp_path)
    worker.wait_polling()
    job = fake_runpod.submit(
        worker.endpoint, json_request("sleeper", SLEEPER, str(tmp_path / "unused"), 1.5)
    )
    fake_runpod.wait_for(lambda f: f.jobs[job].status == "IN_PROGRESS", 30)

    worker.process.proc.send_signal(signal.SIGTERM)

    done = fake_runpod.wait(job, 30)
    assert done["status"] == "COMPLETED"
    assert done["output"]["json_result"] == "slept"
    assert worker.process.proc.wait(30) == 0


@pytest.mark.parametrize(
    ("fixture", "code", "expected"),
    [("01", 0, "'result': 'gAVLMi4='"), ("06", 1, "bad value 42")],
)
def test_test_input_runs_one_job_and_exits_with_its_outcome(
    tmp_path: Path, fixture: str, code: int, expected: str
) -> None:
    job = json.dumps(fixture_bodies(fixture)[0])
    done = subprocess.run(
        [sys.executable, "-m", "flashrt_qb", "--test_input", job],
        env=clean_env(FLASHRT_VOLUME_DIR=str(tmp_path / "no-volume")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stdout + done.stderr
    assert expected in done.stdout


PRINT_WHILE_CAPTURING = """
import sys, threading, time
from flashrt_core import capture
sys.stdout = open("/dev/null", "w")
stop = False
def printer():
    while not stop:
        print("the SDK's job loop logs", "from its own thread")
thread = threading.Thread(target=printer)
thread.start()
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:  # requests start and end on the runtime's thread
    capture.activate()
    capture.deactivate()
stop = True
thread.join()
"""


def test_a_thread_printing_while_requests_start_and_end_does_not_crash() -> None:
    # The SDK's loop prints from the main thread while the runtime's thread installs and
    # removes the capture routers; print() holds a borrowed sys.stdout (a freed router was a
    # segfault), so this runs in a child process of its own.
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", PRINT_WHILE_CAPTURING],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
