"""Deployed mode runs the concurrency the user set: ``Endpoint(max_concurrency=4)``.

``flash build`` writes ``max_concurrency`` into the manifest and generates an ``async def``
handler that awaits the function (``tests/deployed_app/naps.py``: one async, one plain ``def``,
which 1.21 marks ``is_async`` too, and a class with one of each, whose handler awaits both). Real
``flashrt-qb`` workers serve that artifact through the fake control plane and the SDK's
production job loop; four 1 s jobs are queued at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from e2e_support import start_qb_worker, stop_all, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from e2e_support import RunningWorker, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow


class Naps:
    def __init__(self, workers: dict[str, RunningWorker], cold: list[str]) -> None:
        self.async4 = workers["async4"]  # max_concurrency=4 from the manifest
        self.async1 = workers["async1"]  # the same, FLASHRT_QB_CONCURRENCY=1
        self.sync4 = workers["sync4"]  # a plain def, max_concurrency=4
        self.class4 = workers["class4"]  # a class: an async and a plain method
        #: Four jobs queued for async4 as its worker was spawned, before start-up finished.
        self.cold = cold


@pytest.fixture(scope="module")
def naps(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    deployed_artifact: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Naps]:
    plans: dict[str, tuple[str, dict[str, str]]] = {
        "async4": ("nap_async", {}),
        "async1": ("nap_async", {"FLASHRT_QB_CONCURRENCY": "1"}),
        "sync4": ("nap_sync", {}),
        "class4": ("nap_class", {}),
    }
    workers: dict[str, RunningWorker] = {}
    cold: list[str] = []
    for key, (resource, extra) in plans.items():
        workers[key] = start_qb_worker(
            spawn_worker,
            fake_runpod,
            f"ep-nap-{key}",
            tmp_path_factory.mktemp(f"nap-{key}"),
            FLASH_RESOURCE_NAME=resource,
            FLASH_BUILD_ARTIFACT_PATH=str(deployed_artifact),
            FLASHRT_SPARE="0",  # nothing here recycles an executor: one process less each
            **extra,
        )
        if key == "async4":
            cold = [fake_runpod.submit(workers[key].endpoint, {"seconds": 1}) for _ in range(4)]
    for worker in workers.values():
        worker.wait_polling()
    fake_runpod.wait_all(cold, timeout=90)  # the other tests find the worker idle
    yield Naps(workers, cold)
    stop_all([w.process for w in workers.values()])


def _ready(worker: RunningWorker) -> str:
    """Once the worker is ready: its ready line."""
    wait_until(lambda: "ready: deployed" in worker.process.log(), 90, "the ready line")
    return next(line for line in worker.process.log().splitlines() if "ready: deployed" in line)


def _drain(
    fake: FakeRunPod, worker: RunningWorker, inputs: list[Any]
) -> tuple[float, list[dict[str, Any]]]:
    """Queue ``inputs`` at once on a ready worker: seconds from queued to the last job-done,
    and each job's final status."""
    _ready(worker)
    ids = [fake.submit(worker.endpoint, job_input) for job_input in inputs]
    done = fake.wait_all(ids, timeout=60)
    with fake.cond:
        jobs = [fake.jobs[i] for i in ids]
        seconds = max(j.finished or 0.0 for j in jobs) - min(j.created for j in jobs)
    return seconds, done


ONE_SECOND = [{"seconds": 1}] * 4


def test_the_manifests_max_concurrency_is_the_window_and_the_log_says_so(naps: Naps) -> None:
    line = _ready(naps.async4)
    assert "4 job(s) at once (max_concurrency of resource 'nap_async' in flash_manifest.json)" in (
        line
    )
    overridden = _ready(naps.async1)
    assert "1 job(s) at once (FLASHRT_QB_CONCURRENCY, over max_concurrency=4 in " in overridden


def test_four_async_jobs_drain_in_about_one_second(fake_runpod: FakeRunPod, naps: Naps) -> None:
    seconds, done = _drain(fake_runpod, naps.async4, ONE_SECOND)
    assert [d["output"] for d in done] == [{"slept": 1}] * 4, done
    assert seconds < 2.5, f"4 jobs of 1 s at max_concurrency=4 took {seconds:.2f} s"


def test_the_setting_overrides_the_manifest(fake_runpod: FakeRunPod, naps: Naps) -> None:
    seconds, done = _drain(fake_runpod, naps.async1, ONE_SECOND)
    assert all(d["status"] == "COMPLETED" for d in done), done
    assert seconds > 3.5, f"4 jobs of 1 s one at a time took only {seconds:.2f} s"


def test_a_plain_def_awaited_by_its_generated_handler_succeeds_concurrently(
    fake_runpod: FakeRunPod, naps: Naps
) -> None:
    seconds, done = _drain(fake_runpod, naps.sync4, ONE_SECOND)
    assert [(d["status"], d["output"]) for d in done] == [("COMPLETED", {"slept": 1})] * 4, done
    assert seconds < 2.5, f"4 plain 1 s jobs at max_concurrency=4 took {seconds:.2f} s"
    assert "handler_nap_sync.py would await a plain function of nap_sync" in (
        naps.sync4.process.log()
    )


def test_a_plain_def_answers_as_the_async_handler_does(fake_runpod: FakeRunPod, naps: Naps) -> None:
    """Same input contract (``__empty`` dropped, defaults apply) and the same failure shape."""
    empty = {"__empty": True}
    plain, async_ = naps.sync4.run(empty), naps.async4.run(empty)
    assert plain["output"] == async_["output"] == {"slept": 1.0}
    bad = {"seconds": 0, "colour": "red"}
    plain, async_ = naps.sync4.run(bad), naps.async4.run(bad)
    assert plain["status"] == async_["status"] == "FAILED"
    assert plain["error"] == "nap_sync() got an unexpected keyword argument 'colour'"
    assert async_["error"] == "nap_async() got an unexpected keyword argument 'colour'"
    assert "Traceback" in plain["output"]["traceback"]
    assert "Traceback" in async_["output"]["traceback"]
    malformed = naps.sync4.run([1, 2])
    assert malformed["status"] == "FAILED"
    assert malformed["error"] == "Malformed input: expected dict, got list"


def test_jobs_queued_before_start_up_read_the_manifest_run_together(
    fake_runpod: FakeRunPod, naps: Naps
) -> None:
    """The window grows when start-up has read the manifest: the job loop, holding the one job
    it could take before, takes the other three at once instead of after that job."""
    done = fake_runpod.wait_all(naps.cold, timeout=90)
    assert all(d["status"] == "COMPLETED" for d in done), done
    with fake_runpod.cond:
        finished = [fake_runpod.jobs[i].finished or 0.0 for i in naps.cold]
    spread = max(finished) - min(finished)
    assert spread < 0.6, f"the cold burst finished over {spread:.2f} s, not together"


def test_a_classs_plain_and_async_methods_both_run_concurrently(
    fake_runpod: FakeRunPod, naps: Naps
) -> None:
    dozes = [{"method": "doze", "seconds": 1}] * 4
    seconds, done = _drain(fake_runpod, naps.class4, dozes)
    assert [(d["status"], d["output"]) for d in done] == [("COMPLETED", {"dozed": 1})] * 4, done
    assert seconds < 2.5, f"4 plain 1 s methods at max_concurrency=4 took {seconds:.2f} s"
    seconds, done = _drain(fake_runpod, naps.class4, [{"method": "nap", "seconds": 1}] * 4)
    assert [d["output"] for d in done] == [{"napped": 1}] * 4, done
    assert seconds < 2.5, f"4 async 1 s methods at max_concurrency=4 took {seconds:.2f} s"


def test_a_class_job_without_a_usable_method_fails_as_the_generated_handler_says(
    naps: Naps,
) -> None:
    missing = naps.class4.run({"seconds": 0})
    assert missing["status"] == "FAILED"
    assert missing["error"] == (
        'class Cot has multiple methods: doze, nap. include a "method" key in the input.'
    )
    unknown = naps.class4.run({"method": "snore"})
    assert unknown["error"] == "unknown method 'snore' on Cot. available: doze, nap"
    bad = naps.class4.run({"method": "doze", "hours": 8})
    assert bad["error"] == "Cot.doze() got an unexpected keyword argument 'hours'"
