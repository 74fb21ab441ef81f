"""Deployed generators stream: a real ``flash build`` artifact, real ``flashrt-qb`` workers.

A generator function's generated handler returns the generator; each item must reach the
platform's stream endpoint as it is yielded (across the executor's process boundary, or
in-process), and job-done must carry the aggregate that ``/runsync`` and ``/status`` show, the
way the runpod SDK streams a generator handler. The fake control plane records when each item
arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2e_support import clean_env, start_qb_worker, stop_all

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from e2e_support import RunningWorker, WorkerProcess
    from fake_runpod import FakeJob, FakeRunPod

pytestmark = pytest.mark.slow

#: worker key -> (resource, extra environment)
PLANS: dict[str, tuple[str, dict[str, str]]] = {
    "sync": ("stream_worker", {}),
    "async": ("astream_worker", {}),
    "inprocess": ("stream_worker", {"FLASHRT_ISOLATION": "none"}),
}


@pytest.fixture(scope="module")
def streams(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    deployed_artifact: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, RunningWorker]]:
    workers = {
        key: start_qb_worker(
            spawn_worker,
            fake_runpod,
            f"ep-stream-{key}",
            tmp_path_factory.mktemp(f"stream-{key}"),
            FLASH_RESOURCE_NAME=resource,
            FLASH_BUILD_ARTIFACT_PATH=str(deployed_artifact),
            **extra,
        )
        for key, (resource, extra) in PLANS.items()
    }
    for worker in workers.values():
        worker.wait_polling()
    yield workers
    stop_all([w.process for w in workers.values()])


def _job(worker: RunningWorker, job_input: dict[str, Any]) -> tuple[dict[str, Any], FakeJob]:
    job_id = worker.fake.submit(worker.endpoint, job_input)
    status = worker.fake.wait(job_id, 60)
    with worker.fake.cond:
        return status, worker.fake.jobs[job_id]


@pytest.mark.parametrize("which", list(PLANS))
def test_each_item_reaches_the_stream_as_it_is_yielded(
    streams: dict[str, RunningWorker], which: str
) -> None:
    status, job = _job(streams[which], {"n": 3, "pause": 0.5})
    items = [{"i": 0}, {"i": 1}, {"i": 2}]
    assert status["status"] == "COMPLETED", status
    assert job.stream == items
    assert status["output"] == items  # job-done carried the aggregate
    assert job.done_at is not None and len(job.stream_at) == 3
    # Items 0.5 s apart arrive apart, the first well before the job ends (~1 s later).
    assert job.stream_at[1] - job.stream_at[0] > 0.25
    assert job.done_at - job.stream_at[0] > 0.5


def test_runsync_answers_with_every_item(
    streams: dict[str, RunningWorker], fake_runpod: FakeRunPod
) -> None:
    worker = streams["async"]
    answer = httpx.post(
        f"{fake_runpod.api_base}/{worker.endpoint}/runsync",
        json={"input": {"n": 3, "pause": 0.1}},
        timeout=60,
    ).json()
    assert answer["status"] == "COMPLETED", answer
    assert answer["output"] == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("which", ["sync", "inprocess"])
def test_an_exception_mid_stream_fails_the_job_and_keeps_the_items_sent(
    streams: dict[str, RunningWorker], which: str
) -> None:
    status, job = _job(streams[which], {"n": 3, "pause": 0.1, "fail_at": 2})
    assert status["status"] == "FAILED", status
    assert "RuntimeError: failed after 2 items" in status["error"]
    assert job.stream == [{"i": 0}, {"i": 1}]
    assert status["output"] == [{"i": 0}, {"i": 1}]  # the platform keeps what was streamed


def test_an_item_over_the_platform_limit_ends_the_job_naming_its_size(
    streams: dict[str, RunningWorker],
) -> None:
    status, job = _job(streams["sync"], {"n": 3, "pause": 1, "big_at": 1})
    assert status["status"] == "FAILED", status
    error = status["error"]
    assert "stream item 2 is 21.0 MB" in error and "limit of 20 MB" in error, error
    assert job.stream == [{"i": 0}]
    # Ended at the big item (1 s after the first), not after a third one a second later.
    assert job.done_at is not None and job.done_at - job.stream_at[0] < 1.8


def test_a_generator_that_yields_nothing_completes_empty(
    streams: dict[str, RunningWorker],
) -> None:
    status, job = _job(streams["sync"], {"n": 0})
    assert (status["status"], status["output"], job.stream) == ("COMPLETED", [], [])


def test_an_aggregate_over_the_platform_limit_fails_the_job_after_streaming_every_item(
    streams: dict[str, RunningWorker],
) -> None:
    status, job = _job(streams["sync"], {"n": 2, "pause": 0, "pad": 11_000_000})
    assert status["status"] == "FAILED"
    error = status["error"]
    assert "the stream's 2 items together are 22.0 MB" in error and "limit of 20 MB" in error
    assert [item["i"] for item in job.stream] == [0, 1]  # each streamed, each under the limit


def test_an_executor_dying_mid_stream_fails_the_job_without_running_it_again(
    streams: dict[str, RunningWorker],
) -> None:
    status, job = _job(streams["sync"], {"n": 3, "pause": 0.1, "die_at": 1})
    assert status["status"] == "FAILED", status
    assert "executor process running this request" in status["error"], status
    assert job.stream == [{"i": 0}]  # streamed once: a second run would repeat it
    again, _ = _job(streams["sync"], {"n": 2, "pause": 0})
    assert (again["status"], again["output"]) == ("COMPLETED", [{"i": 0}, {"i": 1}])


def test_test_input_shows_a_generators_items_as_one_list(
    deployed_artifact: Path, tmp_path: Path
) -> None:
    # The SDK's local mode has no stream to post to: the items come back as the output.
    env = clean_env(
        RUNPOD_ENDPOINT_ID="local-preview",
        FLASH_RESOURCE_NAME="stream_worker",
        FLASH_BUILD_ARTIFACT_PATH=str(deployed_artifact),
        FLASHRT_APP_DIR=str(tmp_path / "app"),
        FLASHRT_VOLUME_DIR=str(tmp_path / "no-volume"),
    )
    job = json.dumps({"input": {"n": 2, "pause": 0}})
    done = subprocess.run(
        [sys.executable, "-m", "flashrt_qb", "--test_input", job],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Job result: {'output': [{'i': 0}, {'i': 1}]}" in done.stdout
