"""flashrt-qb's parts in-process: settings, job output shape, start-up bound, deployed handler."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import hookimpl
from flashrt_core.protocol import FunctionResponse
from flashrt_core.runtime import Runtime
from flashrt_core.settings import Settings, load_settings
from flashrt_qb.deployed import DeployedHandlerError, is_function_request, load_handler
from flashrt_qb.sdk import cpu_brand
from flashrt_qb.settings import QBSettings
from flashrt_qb.worker import QueueWorker, response_output

if TYPE_CHECKING:
    from pathlib import Path

    from flashrt_core.context import PluginContext

ADD = {
    "function_name": "add",
    "function_code": "def add(a, b):\n    print('adding')\n    return a + b\n",
    "args": [2, 3],
    "serialization_format": "json",
}


@pytest.mark.parametrize(
    ("env", "window"),
    [
        ({}, 1),
        ({"FLASHRT_QB_CONCURRENCY": "4"}, 4),
        ({"FLASHRT_QB_PREFETCH": "2"}, 3),
        ({"FLASHRT_QB_CONCURRENCY": "4", "FLASHRT_QB_PREFETCH": "1"}, 5),
    ],
)
def test_the_job_window_is_running_plus_opt_in_prefetched_jobs(
    env: dict[str, str], window: int
) -> None:
    qb = load_settings(QBSettings, env)
    worker = QueueWorker(Settings(disable_plugin_autoload=True), qb)
    assert worker.concurrency_modifier(1) == window
    assert worker.sdk_config()["concurrency_modifier"](7) == window


@pytest.mark.parametrize(
    ("max_concurrency", "env", "slots", "said"),
    [
        (3, {}, 3, "3 job(s) at once (max_concurrency of resource 'w_{n}' in flash_manifest.json)"),
        (3, {"FLASHRT_QB_CONCURRENCY": "2"}, 2, "(FLASHRT_QB_CONCURRENCY, over max_concurrency=3"),
        (None, {}, 1, "1 job(s) at once (the default: resource 'w_{n}' sets no max_concurrency)"),
        ("four", {}, 1, "(the default: resource 'w_{n}' of flash_manifest.json has max_concurre"),
        (0, {}, 1, "max_concurrency 0, not a whole number of at least 1"),
    ],
)
def test_a_deployed_workers_window_is_its_manifests_max_concurrency_unless_set(
    max_concurrency: Any,
    env: dict[str, str],
    slots: int,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import uuid

    caplog.set_level(logging.INFO, "flashrt")
    resource = f"w_{uuid.uuid4().hex[:12]}"  # each imports its own handler module
    said = said.replace("w_{n}", resource)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / f"handler_{resource}.py").write_text("def handler(job):\n    return 1\n")
    spec: dict[str, Any] = {"functions": [{"name": "f", "module": "m", "is_async": True}]}
    if max_concurrency is not None:
        spec["max_concurrency"] = max_concurrency
    (app_dir / "flash_manifest.json").write_text(json.dumps({"resources": {resource: spec}}))
    monkeypatch.setenv("FLASHRT_APP_DIR", str(app_dir))
    settings = Settings(
        disable_plugin_autoload=True, isolation="none", resource_name=resource, disable_unpack=True
    )
    worker = QueueWorker(settings, load_settings(QBSettings, env))
    assert worker.concurrency_modifier(1) == (2 if env else 1)  # before start-up: what is known
    worker.begin()
    try:
        assert worker.loop.submit(worker.handle({"id": "1", "input": {}})).result(30) == 1
        assert worker.window.slots == slots
        assert worker.concurrency_modifier(1) == slots
    finally:
        worker.close()
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready: ")]
    assert len(ready) == 1 and said in ready[0], ready


def test_sdk_log_level_defaults_to_info_and_follows_either_variable() -> None:
    assert load_settings(QBSettings, {}).sdk_level == "INFO"
    assert load_settings(QBSettings, {"RUNPOD_DEBUG_LEVEL": "debug"}).sdk_level == "DEBUG"
    both = {"RUNPOD_DEBUG_LEVEL": "debug", "RUNPOD_LOG_LEVEL": "ERROR"}
    assert load_settings(QBSettings, both).sdk_level == "ERROR"


def test_response_output_drops_empty_fields_and_never_fails_without_an_error() -> None:
    ok = response_output(FunctionResponse(success=True, json_result=5, stdout=""))
    assert ok == {"success": True, "json_result": 5, "stdout": ""}
    failed = response_output(FunctionResponse(success=False, stdout="out\n"))
    assert failed["error"] and failed["stdout"] == "out\n" and failed["success"] is False


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        ({"a": 1, "b": 2}, False),
        ({"method": "bump", "by": 2}, False),
        ({"function_name": "add"}, False),  # a user function may take such a kwarg
        ({"function_name": "add", "execution_type": "function"}, True),
        ({"class_name": "C", "execution_type": "class"}, True),
        ({"function_code": "def f(): pass", "function_name": "f"}, True),
        ("text", False),
        (None, False),
    ],
)
def test_deployed_mode_tells_function_requests_from_plain_kwargs(
    job_input: Any, expected: bool
) -> None:
    assert is_function_request(job_input) is expected


class _SlowStartup:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    @hookimpl
    def flashrt_startup(self, context: PluginContext) -> Any:
        return self.release.wait()


def test_a_job_waits_for_start_up_only_as_long_as_the_bound_then_jobs_are_served() -> None:
    plugin = _SlowStartup()
    settings = Settings(disable_plugin_autoload=True)
    runtime = Runtime(settings, extra_plugins=(plugin,))
    worker = QueueWorker(settings, QBSettings(startup_timeout_s=0.2), runtime=runtime)
    worker.begin()
    try:
        early = worker.loop.submit(worker.handle({"id": "1", "input": ADD})).result(30)
        assert early == {
            "success": False,
            "error": "worker start-up has not finished after 0.2 s: still starting the runtime "
            "(plugins, volume cache, artifact, the executor process)",
        }
        worker.loop.loop.call_soon_threadsafe(plugin.release.set)
        for _ in range(600):  # start-up goes on past the bound (the executor still starts)
            if worker.readiness.phase != "starting":
                break
            time.sleep(0.05)
        later = asyncio.run(worker.handler({"id": "2", "input": ADD}))
        assert later["success"] is True and later["json_result"] == 5
        assert later["stdout"] == "adding\n"
    finally:
        worker.close()


class _FailingStartup:
    @hookimpl
    def flashrt_startup(self, context: PluginContext) -> Any:
        raise RuntimeError("no GPU is visible")


def test_a_failed_start_up_fails_every_job_with_the_reason() -> None:
    settings = Settings(disable_plugin_autoload=True)
    runtime = Runtime(settings, extra_plugins=(_FailingStartup(),))
    worker = QueueWorker(settings, QBSettings(), runtime=runtime)
    worker.begin()
    try:
        answers = [
            worker.loop.submit(worker.handle({"id": str(n), "input": ADD})).result(30)
            for n in range(2)
        ]
        reason = "start-up failed: RuntimeError: no GPU is visible"
        assert answers == [{"success": False, "error": reason}] * 2
        assert (worker.readiness.phase, worker.readiness.reason) == ("failed", reason)
    finally:
        worker.close()


def test_a_worker_stopped_while_starting_reads_failed() -> None:
    plugin = _SlowStartup()
    settings = Settings(disable_plugin_autoload=True)
    worker = QueueWorker(settings, QBSettings(), runtime=Runtime(settings, extra_plugins=(plugin,)))
    worker.begin()
    deadline = time.monotonic() + 30
    while "starting the runtime" not in worker.readiness.now_doing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.close()
    assert worker.readiness.phase == "failed"
    assert worker.readiness.reason == "start-up was cancelled (the worker is stopping)"


STUCK_HANDLER = """
import os
import time

while not os.path.exists({flag!r}):  # a model load that does not finish in time
    time.sleep(0.02)


def handler(job):
    return job["input"]
"""


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_deployed_handler_still_loading_at_the_limit_fails_jobs_naming_it(
    isolation: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "flashrt")
    resource = f"stuck_qb_unit_{isolation}"
    handler_file = f"handler_{resource}.py"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    release = tmp_path / "release"
    (app_dir / handler_file).write_text(STUCK_HANDLER.format(flag=str(release)))
    monkeypatch.setenv("FLASHRT_APP_DIR", str(app_dir))
    settings = Settings(
        disable_plugin_autoload=True,
        isolation=isolation,
        resource_name=resource,
        disable_unpack=True,
        startup_timeout_s=3.0,
        startup_progress_s=0.3,
    )
    worker = QueueWorker(settings, QBSettings(startup_timeout_s=0.2))

    def job(n: int) -> Any:
        return worker.loop.submit(worker.handle({"id": str(n), "input": {"n": n}}))

    worker.begin()
    try:
        deadline = time.monotonic() + 30
        while handler_file not in worker.readiness.now_doing:
            assert time.monotonic() < deadline, worker.readiness.now_doing
            time.sleep(0.01)
        # A job that stops waiting before start-up ends hears what is still starting.
        early = job(1).result(30)
        assert early["success"] is False
        assert "start-up has not finished after 0.2 s: still " in early["error"]
        assert f"importing the deployed handler {handler_file}" in early["error"]
        # One that waits longer, and one sent after the limit, hear the limit and the step.
        worker.qb = dataclasses.replace(worker.qb, startup_timeout_s=60.0)
        waiting = job(2).result(60)
        assert worker.readiness.phase == "failed"
        after = job(3).result(30)
        for answer in (waiting, after):
            assert answer["success"] is False
            assert (
                "start-up did not finish within 3 s (FLASHRT_STARTUP_TIMEOUT_S)" in answer["error"]
            )
            assert f"still importing the deployed handler {handler_file}" in answer["error"]
        # An executor's import ends with the executor; one in this process is left behind.
        assert worker.readiness.left_running is (isolation == "none")
    finally:
        release.touch()
        worker.close()
    # Meanwhile a line said what was still starting (an executor logs to the worker's stderr).
    logged = caplog.text + capfd.readouterr().err
    assert f"start-up still running after 1 s: importing the deployed handler {handler_file}" in (
        logged
    )


def test_a_job_whose_input_is_not_an_object_fails_clearly() -> None:
    worker = QueueWorker(Settings(disable_plugin_autoload=True), QBSettings())
    worker.begin()
    try:
        out = asyncio.run(worker.handler({"id": "1", "input": ["add", 2, 3]}))
        assert out["success"] is False
        assert "must be a FunctionRequest object, got list" in out["error"]
    finally:
        worker.close()


def test_load_handler_names_the_handlers_a_build_has(tmp_path: Path) -> None:
    (tmp_path / "handler_other.py").write_text("def handler(job):\n    return 1\n")
    with pytest.raises(DeployedHandlerError, match=r"handler_mine\.py is not in .*for: other"):
        load_handler(tmp_path, "mine")
    with pytest.raises(DeployedHandlerError, match="not a valid resource name"):
        load_handler(tmp_path, "../etc")


def test_load_handler_reports_an_import_failure_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "handler_broken_qb_unit.py").write_text("raise RuntimeError('no model file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DeployedHandlerError) as failure:
        load_handler(tmp_path, "broken_qb_unit")
    assert "RuntimeError: no model file" in str(failure.value)
    assert "Traceback" in str(failure.value)


def test_cpu_brand_is_the_model_name_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 3.00GHz\n")
    assert cpu_brand(info) == "Example CPU @ 3.00GHz"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_brand(info) is None
    assert cpu_brand(tmp_path / "missing") is None


def test_the_fast_sdk_import_gives_the_sdk_the_same_brand_and_restores_cpuinfo() -> None:
    probe = textwrap.dedent(
        """
        import cpuinfo
        original = cpuinfo.get_cpu_info
        from flashrt_qb.sdk import cpu_brand, import_serverless
        import_serverless(True)
        from runpod.serverless.utils import rp_debugger
        assert cpuinfo.get_cpu_info is original, "cpuinfo not restored"
        brand = cpu_brand()
        assert brand is None or rp_debugger.PROCESSOR == brand, (rp_debugger.PROCESSOR, brand)
        print("ok", rp_debugger.PROCESSOR)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


def test_sdk_internals_the_job_loop_relies_on() -> None:
    """Fails loudly when a runpod release moves what :mod:`flashrt_qb.job_loop` and
    :mod:`flashrt_qb.job_result` build on."""
    import inspect

    import runpod
    from flashrt_qb import job_loop
    from flashrt_qb.sdk import import_serverless
    from runpod import http_client
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules import (
        rp_fitness,
        rp_http,
        rp_job,
        rp_logger,
        rp_scale,
        worker_state,
    )

    serverless = import_serverless()
    major, minor = (int(x) for x in runpod.__version__.split(".")[:2])
    assert (major, minor) == (1, 12), (
        f"job_loop is checked against runpod 1.12, not {runpod.__version__}"
    )
    for name in ("_set_config_args", "_signal_handler", "runpod_version", "start", "parser"):
        assert hasattr(serverless, name), f"runpod.serverless.{name} is gone"
    assert isinstance(sdk_worker.heartbeat, rp_ping_heartbeat()), "worker.heartbeat changed"
    assert callable(rp_fitness.run_fitness_checks)
    assert callable(worker_state.PingJobMirror) and callable(worker_state.JobsProgress)
    assert callable(rp_logger._set_batch_id) and callable(rp_logger._reset_batch_id)
    assert http_client.TooManyRequests and callable(http_client.AsyncClientSession)
    # flashrt_qb.job_result posts a plain handler's result itself, to the SDK's job-done URL.
    assert isinstance(rp_http.JOB_DONE_URL, str)
    # flashrt_qb.job_stream posts a deployed generator's items to the SDK's stream URL.
    assert isinstance(rp_http.JOB_STREAM_URL, str)
    scaler_attrs = (
        "monitor_stop_signals",
        "stop_job",
        "is_alive",
        "kill_worker",
        "start",
        "handle_shutdown",
    )
    for name in scaler_attrs:
        assert callable(getattr(rp_scale.JobScaler, name)), f"JobScaler.{name} is gone"
    scaler = job_loop.SlotJobScaler({"handler": lambda job: job}, take_timeout_s=3)
    for name in (
        "jobs_fetcher",
        "jobs_handler",
        "job_progress",
        "jobs_tasks",
        "config",
        "concurrency_modifier",
        "current_concurrency",
        "jobs_fetcher_timeout",
    ):
        assert hasattr(scaler, name), f"JobScaler().{name} is gone"
    assert scaler.jobs_fetcher is rp_job.get_job and scaler.jobs_handler is rp_job.handle_job
    assert scaler.jobs_fetcher_timeout == 3
    params = list(inspect.signature(rp_job.get_job).parameters)
    assert params[:2] == ["session", "num_jobs"], params
    assert list(inspect.signature(rp_job.handle_job).parameters)[:3] == ["session", "config", "job"]
    # The methods replaced here are still the ones the SDK's run() drives.
    run_source = inspect.getsource(rp_scale.JobScaler.run)
    assert "get_jobs" in run_source and "run_jobs" in run_source


def rp_ping_heartbeat() -> type:
    from runpod.serverless.modules.rp_ping import Heartbeat

    return Heartbeat


@pytest.mark.parametrize(
    ("argv", "env", "production"),
    [
        (["w"], {"RUNPOD_WEBHOOK_GET_JOB": "http://x/job-take/$ID"}, True),
        (["w"], {}, False),
        (["w", "--test_input", "{}"], {"RUNPOD_WEBHOOK_GET_JOB": "u"}, False),
        (["w", "--rp_serve_api"], {"RUNPOD_WEBHOOK_GET_JOB": "u"}, False),
        (["w", "--test_inp={}"], {"RUNPOD_WEBHOOK_GET_JOB": "u"}, False),
        (["w", "--rp_log_level", "DEBUG"], {"RUNPOD_WEBHOOK_GET_JOB": "u"}, True),
        (["w"], {"RUNPOD_WEBHOOK_GET_JOB": "u", "RUNPOD_REALTIME_PORT": "8000"}, False),
    ],
)
def test_local_modes_stay_the_sdks(argv: list[str], env: dict[str, str], production: bool) -> None:
    from flashrt_qb.job_loop import is_production
    from flashrt_qb.sdk import import_serverless

    assert is_production(import_serverless(), argv, env) is production
