"""Deployed mode: a real ``flash build`` artifact served by real ``flashrt-qb`` workers.

Four workers start together (their start-ups overlap): the function resource, the class
resource, one whose artifact is missing and one whose artifact is corrupt. Jobs go through the
fake control plane and the SDK's production job loop, like the platform's.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from e2e_support import clean_env, start_qb_worker, stop_all

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from e2e_support import RunningWorker, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow


class Deployed:
    def __init__(self, workers: dict[str, RunningWorker]) -> None:
        self.fn = workers["fn"]
        self.cls = workers["cls"]
        self.missing = workers["missing"]
        self.corrupt = workers["corrupt"]
        self.unpacked = workers["unpacked"]


@pytest.fixture(scope="module")
def deployed(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    deployed_artifact: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    corrupt = tmp_path_factory.mktemp("corrupt") / "artifact.tar.gz"
    data = deployed_artifact.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # a truncated copy
    plans = {
        "fn": ("sync_worker", deployed_artifact),
        "cls": ("calc_worker", deployed_artifact),
        "missing": ("sync_worker", tmp_path_factory.mktemp("nothing") / "artifact.tar.gz"),
        "corrupt": ("sync_worker", corrupt),
    }
    common = {"FLASHRT_ARTIFACT_WAIT_S": "1", "FLASHRT_ARTIFACT_BACKOFF_S": "0.2"}
    workers = {
        key: start_qb_worker(
            spawn_worker,
            fake_runpod,
            f"ep-dep-{key}",
            tmp_path_factory.mktemp(f"dep-{key}"),
            FLASH_RESOURCE_NAME=resource,
            FLASH_BUILD_ARTIFACT_PATH=str(artifact),
            FLASHRT_QB_CONCURRENCY="2",
            **common,
        )
        for key, (resource, artifact) in plans.items()
    }
    # An image with the app already unpacked (flash build's own .build directory).
    workers["unpacked"] = start_qb_worker(
        spawn_worker,
        fake_runpod,
        "ep-dep-unpacked",
        tmp_path_factory.mktemp("dep-unpacked"),
        FLASH_RESOURCE_NAME="sync_worker",
        FLASH_DISABLE_UNPACK="1",
        FLASHRT_APP_DIR=str(deployed_artifact.parent / ".build"),
    )
    for worker in workers.values():
        worker.wait_polling()
    yield Deployed(workers)
    stop_all([w.process for w in workers.values()])


def _json_request(**fields: Any) -> dict[str, Any]:
    """A code-less FunctionRequest with plain-JSON arguments (no client sends these)."""
    return {"serialization_format": "json", **fields}


def test_plain_json_jobs_return_the_function_result(deployed: Deployed) -> None:
    done = deployed.fn.run({"a": 2, "b": 3, "scale": 10})
    assert done["status"] == "COMPLETED", done
    assert done["output"] == 50


def test_a_large_argument_crosses_to_the_deployed_handler_and_back(deployed: Deployed) -> None:
    # 4 MiB: over the size that crosses to the executor out of band, both ways.
    big = "x" * (4 << 20)
    plain = deployed.fn.run({"a": big, "b": "y", "scale": 1}, timeout=120)
    assert plain["status"] == "COMPLETED", str(plain)[:2000]
    assert plain["output"] == big + "y"
    codeless = deployed.fn.run(
        _json_request(function_name="add", execution_type="function", args=[big, "z"]), timeout=120
    )
    assert codeless["status"] == "COMPLETED", str(codeless)[:2000]
    assert codeless["output"]["json_result"] == big + "z"


def test_an_already_unpacked_app_is_served_without_an_artifact(deployed: Deployed) -> None:
    plain = deployed.unpacked.run({"a": 1, "b": 1, "scale": 3})
    codeless = deployed.unpacked.run(
        _json_request(function_name="add", execution_type="function", args=[1, 2])
    )
    assert (plain["status"], plain["output"]) == ("COMPLETED", 6)
    assert codeless["output"]["json_result"] == 3


def test_plain_json_job_with_bad_kwargs_fails_with_the_handler_error(deployed: Deployed) -> None:
    done = deployed.fn.run({"a": 2})
    assert done["status"] == "FAILED"
    assert "missing 1 required positional argument: 'b'" in done["error"]


def test_codeless_request_runs_a_function_of_the_function_registry(deployed: Deployed) -> None:
    done = deployed.fn.run(
        _json_request(
            function_name="add", execution_type="function", args=[2, 3], kwargs={"scale": 10}
        )
    )
    assert done["status"] == "COMPLETED", done
    assert done["output"]["json_result"] == 50
    assert done["output"]["stdout"] == "adding 2 + 3\n"


def test_a_request_with_code_still_runs_its_own_code(deployed: Deployed) -> None:
    from e2e_support import fixture_bodies

    done = deployed.fn.run(fixture_bodies("07")[0]["input"])  # a live request, code included
    assert done["status"] == "COMPLETED", done
    assert done["output"]["json_result"] == 50


def test_codeless_request_for_a_name_not_in_the_registry_says_so(deployed: Deployed) -> None:
    done = deployed.fn.run(_json_request(function_name="nope", execution_type="function"))
    assert done["status"] == "FAILED"
    assert "'nope' is not in the deployed app's function_registry" in done["error"]
    assert "Counter, add" in done["error"]


def test_class_resource_serves_methods_of_its_one_instance(deployed: Deployed) -> None:
    first = deployed.cls.run({"method": "bump", "by": 2})
    second = deployed.cls.run({"method": "bump", "by": 3})
    peek = deployed.cls.run({"method": "peek", "__empty": True})
    assert [first["output"], second["output"], peek["output"]] == [
        {"calls": 2},
        {"calls": 5},
        {"calls": 5},
    ]


def test_codeless_class_request_builds_its_instance_from_constructor_args(
    deployed: Deployed,
) -> None:
    request = _json_request(
        execution_type="class",
        class_name="Counter",
        method_name="bump",
        constructor_args=[10],
        kwargs={"by": 1},
        instance_id="Counter_0001",
        create_new_instance=False,
    )
    outputs = [deployed.cls.run(request)["output"] for _ in range(2)]
    assert [o["json_result"] for o in outputs] == [{"calls": 11}, {"calls": 12}]
    assert outputs[1]["instance_info"]["method_calls"] == 2


@pytest.mark.parametrize(
    ("which", "reason"), [("missing", "did not appear within 1 s"), ("corrupt", "")]
)
def test_unusable_artifact_fails_every_job_with_the_reason(
    deployed: Deployed, which: str, reason: str
) -> None:
    worker = getattr(deployed, which)
    jobs = [
        {"a": 2, "b": 3},
        _json_request(function_name="add", execution_type="function", args=[1, 2]),
        {"a": 4, "b": 5},
    ]
    for job in jobs:
        done = worker.run(job)
        assert done["status"] == "FAILED", done
        assert done["error"].startswith("deployed app 'sync_worker' unavailable: ")
        assert "artifact" in done["error"] and reason in done["error"]
    if which == "corrupt":
        assert "artifact.tar.gz" in done["error"]


def _test_input(job: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``flashrt-qb --test_input JOB``: one job, then the worker exits."""
    return subprocess.run(
        [sys.executable, "-m", "flashrt_qb", "--test_input", job],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_real_client_reaches_the_deployed_function_through_flash_runsync(
    deployed: Deployed,
    fake_runpod: FakeRunPod,
    flash_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Called outside `flash dev`, a deployed app's function goes through the sentinel route
    # with the app/environment/endpoint in headers; the fake maps the endpoint to our worker.
    monkeypatch.delenv("FLASH_IS_LIVE_PROVISIONING")
    monkeypatch.setenv("FLASH_APP", "demoapp")
    monkeypatch.setenv("FLASH_ENV", "staging")
    monkeypatch.setitem(fake_runpod.flash_routes, "sync_worker", deployed.fn.endpoint)
    from e2e_support import TESTS

    spec = importlib.util.spec_from_file_location(
        "flashrt_tests_deployed_workers", TESTS / "deployed_app" / "workers.py"
    )
    assert spec is not None and spec.loader is not None
    workers = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, workers)
    spec.loader.exec_module(workers)

    import asyncio

    assert asyncio.run(workers.add(2, 3, scale=10)) == 50


def test_test_input_runs_one_plain_json_job_locally(
    deployed_artifact: Path, tmp_path: Path
) -> None:
    # As the client's local preview runs it: without an endpoint id, runpod-flash would take
    # the app's functions for remote ones and call them over the network.
    env = clean_env(
        RUNPOD_ENDPOINT_ID="local-preview",
        FLASH_RESOURCE_NAME="sync_worker",
        FLASH_BUILD_ARTIFACT_PATH=str(deployed_artifact),
        FLASHRT_APP_DIR=str(tmp_path / "app"),
        FLASHRT_VOLUME_DIR=str(tmp_path / "no-volume"),
    )
    job = json.dumps({"input": {"a": 2, "b": 3, "scale": 10}})
    done = _test_input(job, env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Job result: {'output': 50}" in done.stdout


def test_a_handler_import_past_the_start_up_limit_fails_the_job_and_the_worker_exits(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "handler_frozen.py").write_text(
        "import time\n\nwhile True:  # never finishes importing\n    time.sleep(0.05)\n"
    )
    env = clean_env(
        RUNPOD_ENDPOINT_ID="local-preview",
        FLASH_RESOURCE_NAME="frozen",
        FLASH_DISABLE_UNPACK="1",
        FLASHRT_APP_DIR=str(app),
        FLASHRT_VOLUME_DIR=str(tmp_path / "no-volume"),
        FLASHRT_ISOLATION="none",  # the import's thread is this process's: it must not hold it
        FLASHRT_STARTUP_TIMEOUT_S="1",
        FLASHRT_STARTUP_PROGRESS_S="0.3",
    )
    job = json.dumps({"input": {"a": 2, "b": 3}})
    done = _test_input(job, env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "start-up still running after" in output
    assert "importing the deployed handler handler_frozen.py" in output
    assert "start-up did not finish within 1 s (FLASHRT_STARTUP_TIMEOUT_S)" in done.stdout
