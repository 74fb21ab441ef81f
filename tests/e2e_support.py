"""Helpers of the cross-package end-to-end tests (the fixtures that use them are in conftest).

* :class:`WorkerProcess`: a worker as a real subprocess in a process group of its own, its
  output in a log file, always stopped with SIGTERM then SIGKILL of the group.
* :func:`make_layered_venv`: a throwaway venv over the workspace's, so a worker that installs
  packages (fixture 03's numpy) installs them there, never into the workspace.
* :class:`FlashClient`: the real runpod-flash client pointed at the fake control plane, with its
  resource cache pre-seeded so nothing is provisioned (docs/contracts.md, "Driving the real
  client offline").
* :class:`RunningWorker` / :func:`start_qb_worker`: a ``flashrt-qb`` worker of one endpoint.
* :func:`once_per_run`: a costly session fixture (a ``flash build``) made once for all the
  parallel test processes of one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import venv
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from fake_runpod import FakeRunPod

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: Committed copies of ../shared/fixtures (a core test keeps them equal to the originals).
CLIENT_REQUESTS = ROOT / "packages" / "flashrt-core" / "tests" / "fixtures" / "client-requests"

#: Environment variables a worker must not inherit from the machine (platform/client state).
_SCRUB_PREFIXES = ("RUNPOD_", "FLASH_", "FLASHRT_")


def fixture_bodies(name: str) -> list[dict[str, Any]]:
    """The request bodies of one captured fixture file (``"01"`` ... ``"10"``)."""
    matches = sorted(CLIENT_REQUESTS.glob(f"{name}*.json"))
    assert matches, f"no fixture {name} in {CLIENT_REQUESTS}"
    return [entry["body"] for entry in json.loads(matches[0].read_text())]


def json_request(name: str, code: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A live FunctionRequest for ``name`` defined in ``code``, with plain-JSON arguments."""
    return {
        "function_name": name,
        "function_code": code,
        "args": list(args),
        "kwargs": kwargs,
        "execution_type": "function",
        "serialization_format": "json",
    }


#: ``sleeper(marker, seconds)``: touches ``marker.started``, sleeps, writes ``marker`` if cancelled.
SLEEPER = """\
async def sleeper(marker, seconds):
    import asyncio
    open(marker + ".started", "w").close()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        open(marker, "w").write("cancelled")
        raise
    return "slept"
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without platform/flash settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (bounded); fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def wait_written(path: Path, timeout: float, what: str) -> str:
    """Wait (bounded) until ``path`` has content, and return it: a file user code writes exists
    a moment before its text is in it."""
    wait_until(lambda: path.exists() and path.read_text() != "", timeout, what)
    return path.read_text()


class WorkerProcess:
    """A worker subprocess in a process group of its own, its output in a log file.

    A reader thread copies the output to the log line by line and hands each line (without
    its newline) to ``on_line``: that is how the fake control plane serves live worker logs.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._on_line = on_line
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._copy_output, name="worker-output", daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._log.write(raw)
            self._log.flush()
            if self._on_line is not None:
                self._on_line(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the worker drains), then SIGKILL the whole group if it does not exit."""
        try:
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
        finally:
            # The SDK's heartbeat child too, whatever happened to the parent.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(5)
            self._reader.join(5)
            self._log.close()
        return self.proc.returncode


def stop_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker first, so their drains overlap, then stop each (bounded)."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            worker.signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()


def make_layered_venv(root: Path) -> Path:
    """A venv in ``root`` whose interpreter also sees the workspace's packages, after its own.

    Returns its ``python``; installs by a process running on it land in ``root`` only.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    workspace = sysconfig.get_paths()["purelib"]
    assert Path(workspace).is_dir(), workspace
    # addsitedir also processes the workspace's .pth files (its editable installs).
    (Path(purelib) / "_flashrt_workspace.pth").write_text(
        f"import site; site.addsitedir({workspace!r})\n"
    )
    return python


def load_client_functions() -> ModuleType:
    """Import ``tests/client_app/functions.py`` once (its decorators build client stubs)."""
    name = "flashrt_tests_client_functions"
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")
    path = TESTS / "client_app" / "functions.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with warnings.catch_warnings():  # remote() and CpuLiveServerless are deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        spec.loader.exec_module(module)
    return module


class FlashClient:
    """The real runpod-flash client, aimed at the fake control plane."""

    def __init__(self, fake: FakeRunPod) -> None:
        self.fake = fake

    def seed(self, remote_obj: Any, endpoint_id: str) -> Any:
        """Pre-seed the client's resource cache: ``remote_obj`` runs on ``endpoint_id``."""
        from runpod_flash.core.resources import ResourceManager

        cfg = remote_obj.__remote_config__["resource_config"]
        cfg.id = endpoint_id
        ResourceManager()._add_resource(cfg.get_resource_key(), cfg)
        return cfg

    def stub(self, remote_obj: Any) -> Any:
        """The client's ``LiveServerlessStub`` for a seeded resource (hand-built requests)."""
        from runpod_flash.stubs.live_serverless import LiveServerlessStub

        return LiveServerlessStub(remote_obj.__remote_config__["resource_config"])


class RunningWorker:
    """A worker process serving one endpoint of the fake control plane."""

    def __init__(self, fake: FakeRunPod, endpoint: str, process: WorkerProcess) -> None:
        self.fake = fake
        self.endpoint = endpoint
        self.process = process
        self.worker_id = worker_id_of(endpoint)

    def wait_polling(self, timeout: float = 90.0) -> None:
        """Until the SDK's job loop asks for jobs (start-up may still be running)."""

        def polling() -> bool:
            if self.process.proc.poll() is not None:
                pytest.fail(
                    f"worker exited with {self.process.proc.returncode}:\n{self.process.log()}"
                )
            with self.fake.cond:
                return any(t["worker"] == self.worker_id for t in self.fake.takes)

        wait_until(polling, timeout, f"{self.endpoint}'s worker to poll for jobs")

    def run(self, job_input: Any, timeout: float = 60.0) -> dict[str, Any]:
        """Queue one job and return its final status payload."""
        return self.fake.wait(self.fake.submit(self.endpoint, job_input), timeout)


def worker_id_of(endpoint: str) -> str:
    return f"{endpoint}-worker"


def qb_worker_env(fake: FakeRunPod, endpoint: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a queue worker of ``endpoint`` (no volume, quiet SDK log)."""
    defaults = {
        "FLASHRT_VOLUME_DIR": str(tmp / "no-volume"),
        "FLASHRT_CACHE_DIR": str(tmp / "cache"),
        "FLASHRT_APP_DIR": str(tmp / "app"),
        "RUNPOD_LOG_LEVEL": "INFO",
    }
    return clean_env(
        **fake.worker_env(endpoint, worker_id=worker_id_of(endpoint)), **{**defaults, **extra}
    )


def start_qb_worker(
    spawn_worker: Callable[..., WorkerProcess],
    fake: FakeRunPod,
    endpoint: str,
    tmp: Path,
    *,
    python: Path | str = sys.executable,
    args: tuple[str, ...] = (),
    **extra: str,
) -> RunningWorker:
    """Spawn ``python -m flashrt_qb`` serving ``endpoint`` (``extra``: more environment)."""
    env = qb_worker_env(fake, endpoint, tmp, **extra)
    worker_id = worker_id_of(endpoint)
    process = spawn_worker(
        [str(python), "-m", "flashrt_qb", *args],
        env,
        name=endpoint,
        on_line=lambda line: fake.add_log_line(worker_id, line),
    )
    return RunningWorker(fake, endpoint, process)


def skip_unless_flash_builds_for(version: str) -> None:
    """Skip where the client refuses to build for this Python (runpod-flash 1.21: 3.10-3.13).

    The client's own list decides, so these tests come back when it supports the version.
    """
    from importlib.metadata import version as installed

    from runpod_flash.core.resources.constants import SUPPORTED_PYTHON_VERSIONS

    if version not in SUPPORTED_PYTHON_VERSIONS:
        pytest.skip(
            f"runpod-flash {installed('runpod-flash')} does not support Python {version}:"
            f" `flash build` accepts {', '.join(SUPPORTED_PYTHON_VERSIONS)} only"
        )


def once_per_run(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Path]) -> Path:
    """``make(directory)`` once per test run, its result shared by every test process.

    Under pytest-xdist each worker process has a session of its own, so a session fixture runs
    once per process; their temporary directories share a parent that is the run's own, so the
    first process to get there makes the thing while the others wait on a lock, then all read
    it. Without xdist the session's own directory serves.
    """
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = root / f"once-{name}"
    made = root / f"once-{name}.path"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if made.is_file():
            return Path(made.read_text())
        directory.mkdir(exist_ok=True)
        result = make(directory)
        made.write_text(str(result))
        return result


def flash_build(project: Path, workdir: Path, **env: str) -> Path:
    """Copy ``project`` into ``workdir`` and run the real ``flash build`` there (offline).

    ``env``: more environment for the build (``PYTHONPATH``: packages the app imports that the
    build must see but the artifact leaves out). Returns the artifact
    (``.flash/artifact.tar.gz``); its ``.flash/.build`` stays for reading.
    """
    import shutil

    target = workdir / project.name
    shutil.copytree(project, target, ignore=shutil.ignore_patterns("__pycache__", ".flash"))
    flash = Path(sys.executable).parent / "flash"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    skip_unless_flash_builds_for(version)
    result = subprocess.run(
        [str(flash), "build", "--python-version", version],
        cwd=target,
        env=clean_env(RUNPOD_FLASH_SILENCE_DEPRECATION="1", NO_COLOR="1", **env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    artifact = target / ".flash" / "artifact.tar.gz"
    assert result.returncode == 0 and artifact.is_file(), (
        f"flash build failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return artifact


# --- the executor-process and live-output tests (test_executor_shells, test_live_output) -------


def pickled_request(
    name: str, code: str, *args: Any, timeout_s: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """A live FunctionRequest the way the client sends it: cloudpickled, base64 arguments."""
    import base64

    import cloudpickle

    def enc(value: Any) -> str:
        return base64.b64encode(cloudpickle.dumps(value)).decode()

    body: dict[str, Any] = {
        "function_name": name,
        "function_code": code,
        "args": [enc(a) for a in args],
        "kwargs": {k: enc(v) for k, v in kwargs.items()},
        "dependencies": [],
        "system_dependencies": [],
    }
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    return body


def result_of(response: dict[str, Any]) -> Any:
    """The value of a successful (cloudpickle) FunctionResponse dict."""
    import base64

    import cloudpickle

    assert response.get("success") is True, response
    return cloudpickle.loads(base64.b64decode(response["result"]))


class LineRecorder:
    """An ``on_line`` callback that keeps each output line with its arrival time (monotonic).

    ``then`` (optional) also gets every line, e.g. the fake control plane's log feed.
    """

    def __init__(self, then: Callable[[str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[float, str]] = []
        self._then = then

    def __call__(self, line: str) -> None:
        with self._lock:
            self._entries.append((time.monotonic(), line))
        if self._then is not None:
            self._then(line)

    def entries(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._entries)

    def lines(self) -> list[str]:
        return [line for _, line in self.entries()]

    def arrival(self, line: str) -> float | None:
        """When ``line`` (exactly) first arrived, or None."""
        return next((t for t, seen in self.entries() if seen == line), None)


def parent_of(pid: int) -> int | None:
    """The parent of a live process, from ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid``'s parent, or its parent's (an executor is the worker's
    child, or a fork of the worker's zygote)."""
    parent = parent_of(pid)
    return parent == ancestor or (parent is not None and parent_of(parent) == ancestor)


class Shell:
    """One worker process of either shell, answering FunctionRequests as response dicts.

    ``kind`` is ``"lb"`` (``POST /execute`` on a real uvicorn) or ``"qb"`` (a job on the fake
    control plane, taken by the runpod SDK's job loop); both give back the FunctionResponse
    fields (``success``, ``result``, ``error``, ``stdout``).
    """

    def __init__(
        self,
        kind: str,
        process: WorkerProcess,
        recorder: LineRecorder,
        *,
        base_url: str | None = None,
        queue: RunningWorker | None = None,
    ) -> None:
        self.kind = kind
        self.process = process
        self.recorder = recorder
        self.base_url = base_url
        self.queue = queue
        self.pid = process.proc.pid

    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def execute(self, body: dict[str, Any], timeout: float = 90.0) -> dict[str, Any]:
        if self.kind == "lb":
            import httpx

            response = httpx.post(f"{self.base_url}/execute", json=body, timeout=timeout)
            assert response.status_code == 200, (response.status_code, response.text[:2000])
            payload: dict[str, Any] = response.json()
            return payload
        assert self.queue is not None
        return self._answer(self.queue.run(body, timeout))

    def execute_queued(self, bodies: list[dict[str, Any]], timeout: float = 90.0) -> list[Any]:
        """QB only: queue all the jobs at once (each is taken as soon as the worker can)."""
        assert self.queue is not None, "the LB shell has no queue"
        fake = self.queue.fake
        ids = [fake.submit(self.queue.endpoint, body) for body in bodies]
        return [self._answer(done) for done in fake.wait_all(ids, timeout)]

    @staticmethod
    def _answer(done: dict[str, Any]) -> dict[str, Any]:
        """A job's final status payload as the FunctionResponse fields."""
        output = done.get("output")
        answer: dict[str, Any] = dict(output) if isinstance(output, dict) else {"output": output}
        if done["status"] != "COMPLETED":
            answer["success"] = False
            answer.setdefault("error", done.get("error"))
            answer["status"] = done["status"]
        return answer


def start_lb_shell(
    spawn_worker: Callable[..., WorkerProcess], tmp: Path, *, name: str = "lb", **extra: str
) -> Shell:
    """``flashrt-lb`` (its console script: real uvicorn) on a loopback port, ready."""
    import httpx
    from flashrt_lb.testing import free_port

    port = free_port()
    env = clean_env(
        PORT=str(port),
        FLASHRT_LB_HOST="127.0.0.1",
        FLASHRT_VOLUME_DIR=str(tmp / "no-volume"),
        FLASHRT_CACHE_DIR=str(tmp / "cache"),
        FLASHRT_DISABLE_VOLUME_CACHE="1",
        **extra,
    )
    recorder = LineRecorder()
    script = Path(sys.executable).parent / "flashrt-lb"
    process = spawn_worker([str(script)], env, name=name, on_line=recorder)
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"flashrt-lb exited with {process.proc.returncode}:\n{process.log()}")
        try:
            return httpx.get(f"{base_url}/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 90, f"{name} to answer /ping with 200")
    return Shell("lb", process, recorder, base_url=base_url)


def start_qb_shell(
    spawn_worker: Callable[..., WorkerProcess],
    fake: FakeRunPod,
    endpoint: str,
    tmp: Path,
    **extra: str,
) -> Shell:
    """``python -m flashrt_qb`` serving ``endpoint`` of the fake, polling for jobs."""
    worker_id = worker_id_of(endpoint)
    recorder = LineRecorder(then=lambda line: fake.add_log_line(worker_id, line))
    process = spawn_worker(
        [sys.executable, "-m", "flashrt_qb"],
        qb_worker_env(fake, endpoint, tmp, **extra),
        name=endpoint,
        on_line=recorder,
    )
    queue = RunningWorker(fake, endpoint, process)
    queue.wait_polling()
    return Shell("qb", process, recorder, queue=queue)
