"""Deployed apps whose images lack a package they import: installed at start-up, or a clear failure.

``tests/autoinstall_app`` is built by the real ``flash build`` where ``termcolor`` (a tiny
pure-Python package from PyPI) and ``flashrt_no_such_pkg_xyz`` (a module no index has) are
importable; the artifact holds neither. Each worker runs on a throwaway venv layered over the
workspace's, so what it installs lands there and every run installs again.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from e2e_support import (
    TESTS,
    clean_env,
    flash_build,
    make_layered_venv,
    start_qb_worker,
    wait_until,
)
from flashrt_lb.testing import WorkerProcess

if TYPE_CHECKING:
    from collections.abc import Callable

    from e2e_support import WorkerProcess as QueueProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow

MISSING = "termcolor"
NO_SUCH = "flashrt_no_such_pkg_xyz"


def _uv() -> str:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            pytest.fail("uv is needed to install the build's packages")
        return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec(MISSING) is not None:
        pytest.fail(f"{MISSING} is installed in the test environment: nothing would be installed")
    site = tmp_path_factory.mktemp("build-site")
    # What the build machine has and the image lacks: a real install, seen by the build only.
    subprocess.run(
        [_uv(), "pip", "install", "--quiet", "--target", str(site), MISSING],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (site / f"{NO_SUCH}.py").write_text('"""A private module of the build machine."""\n')
    return flash_build(
        TESTS / "autoinstall_app",
        tmp_path_factory.mktemp("autoinstall-build"),
        PYTHONPATH=str(site),
    )


def test_the_artifact_leaves_both_packages_out(built: Path) -> None:
    app = built.parent / ".build"
    assert (app / "handler_needs_pkg.py").is_file() and (app / "handler_broken_lb.py").is_file()
    assert not list(app.glob(f"{MISSING}*")) and not list(app.glob(f"{NO_SUCH}*"))


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_qb_a_module_the_image_lacks_is_installed_and_the_first_job_succeeds(
    built: Path,
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., QueueProcess],
    tmp_path: Path,
    isolation: str,
) -> None:
    venv, volume, cache = tmp_path / "venv", tmp_path / "volume", tmp_path / "cache"
    volume.mkdir()
    endpoint = f"ep-autoinstall-{isolation}"
    worker = start_qb_worker(
        spawn_worker,
        fake_runpod,
        endpoint,
        tmp_path,
        python=make_layered_venv(venv),
        FLASH_RESOURCE_NAME="needs_pkg",
        FLASH_BUILD_ARTIFACT_PATH=str(built),
        FLASHRT_ISOLATION=isolation,
        # A volume, and uv's cache where the volume cache keeps it: the install is persisted.
        FLASHRT_VOLUME_DIR=str(volume),
        FLASHRT_CACHE_DIR=str(cache),
        UV_CACHE_DIR=str(cache / "uv"),
        FLASHRT_CACHE_PERSIST_DEBOUNCE_S="0.1",
    )
    worker.wait_polling(timeout=150)
    done = worker.run({"text": "hi"}, timeout=150)
    log = worker.process.log()
    assert done["status"] == "COMPLETED", f"{done}\n{log}"
    assert "hi" in done["output"]["text"]
    # Installed into the environment the app runs in (the worker's venv), nowhere else.
    assert Path(done["output"]["from"]).resolve().is_relative_to(venv.resolve())
    assert importlib.util.find_spec(MISSING) is None
    assert f"installed {MISSING} for the missing module '{MISSING}' in " in log
    assert worker.run({"text": "again"})["status"] == "COMPLETED"
    # Cached on the volume like any install: the next cold worker installs from disk.
    tarball = volume / ".cache" / f"cache-{endpoint}.tar"

    def persisted() -> bool:
        if not tarball.is_file():
            return False
        with tarfile.open(tarball) as tar:
            return any(MISSING in name for name in tar.getnames())

    wait_until(persisted, 60, f"{MISSING} in the volume's cache tarball")


def test_qb_a_module_no_index_has_fails_the_jobs_naming_it(
    built: Path,
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., QueueProcess],
    tmp_path: Path,
) -> None:
    worker = start_qb_worker(
        spawn_worker,
        fake_runpod,
        "ep-autoinstall-broken",
        tmp_path,
        python=make_layered_venv(tmp_path / "venv"),
        FLASH_RESOURCE_NAME="broken_qb",
        FLASH_BUILD_ARTIFACT_PATH=str(built),
    )
    worker.wait_polling(timeout=150)
    done = worker.run({"text": "hi"}, timeout=150)
    assert done["status"] == "FAILED", done
    error = done["error"]
    assert f"No module named '{NO_SUCH}'" in error
    assert f"installing the distribution '{NO_SUCH}' for it failed" in error
    _names_the_installers_error(error)


def _names_the_installers_error(text: str) -> None:
    assert "flashrt-installers python (uv/pip): " in text
    # uv's words (pip's, where there is no uv): the index has no such distribution.
    assert (
        "not found in the package registry" in text or "No matching distribution found" in text
    ), text


def _lb_env(built: Path, tmp: Path, resource: str) -> dict[str, str]:
    return clean_env(
        FLASH_RESOURCE_NAME=resource,
        FLASH_ENDPOINT_TYPE="lb",
        FLASH_BUILD_ARTIFACT_PATH=str(built),
        FLASHRT_APP_DIR=str(tmp / "app"),
        FLASHRT_VOLUME_DIR=str(tmp / "no-volume"),
        FLASHRT_CACHE_DIR=str(tmp / "cache"),
        RUNPOD_FLASH_SILENCE_DEPRECATION="1",
    )


def test_lb_a_module_the_image_lacks_is_installed_and_the_app_serves(
    built: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    command = [str(make_layered_venv(venv)), "-m", "flashrt_lb"]
    with WorkerProcess(
        _lb_env(built, tmp_path, "needs_pkg_lb"), cwd=tmp_path, command=command
    ) as worker:
        status, _ = worker.wait_ready(timeout=150)
        assert status == 200, worker.output()
        answer = httpx.post(f"{worker.base_url}/shout", json={"text": "hi"}, timeout=30).json()
        assert "hi" in answer["text"]
        assert Path(answer["from"]).resolve().is_relative_to(venv.resolve())
        assert f"installed {MISSING} for the missing module '{MISSING}' in " in worker.output()
    assert importlib.util.find_spec(MISSING) is None


def test_lb_a_module_no_index_has_gives_503_naming_it(built: Path, tmp_path: Path) -> None:
    command = [str(make_layered_venv(tmp_path / "venv")), "-m", "flashrt_lb"]
    with WorkerProcess(
        _lb_env(built, tmp_path, "broken_lb"), cwd=tmp_path, command=command
    ) as worker:
        status, body = worker.wait_ready(timeout=150)
        assert status == 503, worker.output()
        reason = json.loads(body)["reason"]
        assert reason.startswith("importing handler_broken_lb.py failed: ")
        assert f"No module named '{NO_SUCH}'" in reason
        assert f"installing the distribution '{NO_SUCH}' for it failed" in reason
        _names_the_installers_error(reason)
