"""Shared fixtures of the cross-package tests (helpers live in ``e2e_support``).

* ``fake_runpod``: one :class:`fake_runpod.FakeRunPod` control plane for the session.
* ``spawn_worker``: starts worker subprocesses and always stops them before the fake goes away.
* ``layered_python``: a throwaway venv over the workspace's, for workers that install packages.
* ``flash_client``: the real runpod-flash client pointed at the fake (docs/contracts.md).
* ``client_functions``: ``tests/client_app/functions.py``, the user code of fixtures 01-07.
* ``deployed_artifact``: a real ``flash build`` of ``tests/deployed_app``.
* ``qb_live_worker``: one live-mode ``flashrt-qb`` worker shared by the session's tests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # test modules import fake_runpod and e2e_support (importlib mode)
    sys.path.insert(0, str(TESTS))

from e2e_support import (  # noqa: E402
    FlashClient,
    RunningWorker,
    WorkerProcess,
    flash_build,
    load_client_functions,
    make_layered_venv,
    once_per_run,
    start_qb_worker,
    stop_all,
)
from fake_runpod import FakeRunPod  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType

QB_LIVE_ENDPOINT = "ep-qb-live"


@pytest.fixture(scope="session")
def fake_runpod() -> Iterator[FakeRunPod]:
    with FakeRunPod() as fake:
        yield fake


@pytest.fixture(scope="session")
def spawn_worker(
    fake_runpod: FakeRunPod, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(argv, env, name=..., on_line=...)`` -> a :class:`WorkerProcess`, stopped
    at session end."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def spawn(
        argv: list[str],
        env: dict[str, str],
        *,
        name: str = "worker",
        on_line: Callable[[str], None] | None = None,
    ) -> WorkerProcess:
        cwd = tmp_path_factory.mktemp(f"cwd-{name}")
        worker = WorkerProcess(argv, env, logs / f"{name}-{len(started)}.log", cwd, on_line)
        started.append(worker)
        return worker

    yield spawn
    stop_all(started)


@pytest.fixture(scope="session")
def layered_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_layered_venv(tmp_path_factory.mktemp("layered-venv"))


@pytest.fixture
def flash_client(
    fake_runpod: FakeRunPod, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> FlashClient:
    monkeypatch.chdir(tmp_path)  # the client keeps its resource cache in ./.flash
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake_runpod.api_base)
    monkeypatch.setenv("RUNPOD_URL_MIXED_OK", "1")
    monkeypatch.setenv("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")
    monkeypatch.setenv("FLASH_IS_LIVE_PROVISIONING", "true")
    for name in ("RUNPOD_API_KEY", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID", "FLASH_RESOURCE_NAME"):
        monkeypatch.delenv(name, raising=False)
    import runpod
    import runpod_flash.core.resources.cloud  # noqa: F401  (its import resets runpod.api_key)

    monkeypatch.setattr(runpod, "api_key", "fake-client-key")
    monkeypatch.setattr(runpod, "endpoint_url_base", fake_runpod.api_base)
    return FlashClient(fake_runpod)


@pytest.fixture(scope="session")
def client_functions() -> ModuleType:
    return load_client_functions()


@pytest.fixture(scope="session")
def deployed_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``flash build`` of ``tests/deployed_app``: resources sync_worker, calc_worker, the
    generators' stream_worker and astream_worker, and nap_async, nap_sync and nap_class
    (max_concurrency=4); built once for all the run's test processes, read only."""
    return once_per_run(
        tmp_path_factory, "deployed-app", lambda where: flash_build(TESTS / "deployed_app", where)
    )


@pytest.fixture(scope="session")
def qb_live_worker(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    layered_python: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningWorker:
    """One live-mode queue worker for the session: 4 jobs at once, installs go to a layer."""
    worker = start_qb_worker(
        spawn_worker,
        fake_runpod,
        QB_LIVE_ENDPOINT,
        tmp_path_factory.mktemp("qb-live"),
        python=layered_python,
        FLASHRT_QB_CONCURRENCY="4",
    )
    worker.wait_polling()
    return worker
