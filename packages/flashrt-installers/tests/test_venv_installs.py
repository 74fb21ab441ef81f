"""Real installs from PyPI into a throwaway venv whose own interpreter runs the Runtime.

The venv gets flashrt-core and flashrt-installers (editable, from this checkout) and nothing
else, so every package a request names is really downloaded and installed by uv or pip into that
interpreter, then imported by the request's function in the same process.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flashrt_installers.lockfile import InstallLock

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
FIXTURE_03 = (
    ROOT
    / "packages"
    / "flashrt-core"
    / "tests"
    / "fixtures"
    / "client-requests"
    / "03_function_dependencies_numpy.json"
)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("venv") / "v")


def make_venv(path: Path) -> Path:
    """A fresh venv at ``path`` with this checkout's core and installers; its interpreter."""
    subprocess.run(
        [
            "uv",
            "venv",
            "-q",
            "--seed",
            "--no-python-downloads",
            "--python",
            sys.executable,
            str(path),
        ],
        check=True,
        timeout=120,
    )
    python = path / "bin" / "python"
    subprocess.run(
        [
            "uv",
            "pip",
            "install",
            "-q",
            "--python",
            str(python),
            "-e",
            str(ROOT / "packages" / "flashrt-core"),
            "-e",
            str(ROOT / "packages" / "flashrt-installers"),
        ],
        check=True,
        timeout=180,
    )
    return python


def drive(
    python: Path,
    tmp_path: Path,
    *rounds: list[dict[str, Any]],
    settings: dict[str, Any] | None = None,
) -> list[list[Any]]:
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"rounds": list(rounds), "settings": settings or {}}))
    done = subprocess.run(
        [str(python), str(HERE / "venv_driver.py"), str(scenario)],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result: list[list[Any]] = json.loads(done.stdout.splitlines()[-1])
    return result


def fn(code: str, **fields: Any) -> dict[str, Any]:
    body = {"function_name": "f", "function_code": code, "serialization_format": "json"}
    body.update(fields)
    return body


def test_installs_with_a_version_specifier_and_an_extra_then_warm_requests_run_nothing(
    venv: Path, tmp_path: Path
) -> None:
    code = (
        "def f():\n"
        "    import sys, idna, socks, urllib3\n"
        "    return [idna.__version__, sys.executable, idna.__file__, socks.__file__]\n"
    )
    request = fn(code, dependencies=["idna==3.7", "urllib3[socks]"])
    (cold,), (warm,) = drive(venv, tmp_path, [request], [request])
    assert cold["success"], cold["error"]
    version, executable, idna_file, socks_file = cold["value"]
    assert version == "3.7"
    prefix = str(venv.parent.parent)
    assert executable == str(venv)  # the running interpreter, not some other Python on PATH
    assert idna_file.startswith(prefix) and socks_file.startswith(prefix)
    assert cold["stdout"].startswith("[flashrt] installed idna==3.7, urllib3[socks] with uv in ")
    assert cold["python_installs"] == 1
    # Warm: same process, everything satisfied, no process at all and nothing printed.
    assert warm["success"] and warm["value"] == cold["value"]
    assert warm["stdout"] == ""
    assert warm["processes_started"] == cold["processes_started"]


def test_pip_installs_when_downloads_are_not_accelerated(venv: Path, tmp_path: Path) -> None:
    code = "def f():\n    import iniconfig, sys\n    return iniconfig.__file__\n"
    ((response,),) = drive(
        venv,
        tmp_path,
        [fn(code, dependencies=["iniconfig==2.0.0"], accelerate_downloads=False)],
    )
    assert response["success"], response["error"]
    assert response["value"].startswith(str(venv.parent.parent))
    assert response["stdout"].startswith("[flashrt] installed iniconfig==2.0.0 with pip in ")


def test_two_concurrent_requests_with_the_same_new_dependency_install_it_once(
    venv: Path, tmp_path: Path
) -> None:
    code = "def f():\n    import six\n    return six.__version__\n"
    request = fn(code, dependencies=["six==1.16.0"])
    ((first, second),) = drive(venv, tmp_path, [request, request])
    assert first["success"] and second["success"], (first["error"], second["error"])
    assert first["value"] == second["value"] == "1.16.0"
    assert first["python_installs"] == 1
    outputs = sorted([first["stdout"], second["stdout"]], key=lambda out: "concurrent" in out)
    assert outputs[0].startswith("[flashrt] installed six==1.16.0 with uv in ")
    assert "six==1.16.0 installed by a concurrent request with uv" in outputs[1]


def test_two_processes_installing_one_package_into_one_environment_run_one_installer(
    tmp_path: Path,
) -> None:
    """Two executors of a pool: the install lock lets one run uv, the other finds it done."""
    python = make_venv(tmp_path / "v")
    tmpdir = tmp_path / "tmp"  # both processes' temp dir, so both find the lock file there
    tmpdir.mkdir()
    lock = InstallLock.for_key(
        "python", str(python.parent.parent), "", tmpdir / f"flashrt-locks-{os.getuid()}"
    )
    lock.path.parent.mkdir(mode=0o700)
    code = "def f():\n    import six\n    return [six.__version__, six.__file__]\n"
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"rounds": [[fn(code, dependencies=["six==1.16.0"])]]}))
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    argv = [str(python), str(HERE / "venv_driver.py"), str(scenario)]
    held = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o600)
    children: list[subprocess.Popen[str]] = []
    try:
        # Held here until both processes have found six missing and wait for the lock, so the
        # two really contend, however their start-ups are spread.
        fcntl.flock(held, fcntl.LOCK_EX)
        for _ in range(2):
            children.append(
                subprocess.Popen(
                    argv,
                    cwd=tmp_path,
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 120
        while not all(_has_open(child.pid, lock.path) for child in children):
            for child in children:
                assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the processes never waited for the lock"
            time.sleep(0.02)
    finally:
        os.close(held)
        outputs = [child.communicate(timeout=150) for child in children]
    results = []
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
        ((response,),) = json.loads(out.splitlines()[-1])
        assert response["success"], response["error"]
        version, where = response["value"]
        assert version == "1.16.0" and where.startswith(str(python.parent.parent))
        results.append(response)
    installer, waiter = sorted(results, key=lambda r: r["python_installs"], reverse=True)
    assert (installer["python_installs"], waiter["python_installs"]) == (1, 0)
    assert installer["stdout"].startswith("[flashrt] installed six==1.16.0 with uv in ")
    assert waiter["stdout"].startswith(
        "[flashrt] six==1.16.0 already installed by another process (waited "
    ), waiter["stdout"]
    assert lock.stamp() is not None and lock.path.stat().st_size == 1  # one install in all


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (it is polling the lock)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fds / fd) == str(path) for fd in os.listdir(fds))
    except OSError:
        return False


@pytest.mark.skipif(not FIXTURE_03.exists(), reason=f"{FIXTURE_03} is not there")
def test_fixture_03_numpy_and_libgl1(venv: Path, tmp_path: Path) -> None:
    body = json.loads(FIXTURE_03.read_text())[0]["body"]["input"]
    ((response,),) = drive(venv, tmp_path, [body])
    if not response["success"] and "not root" in (response["error"] or ""):
        pytest.skip("libgl1 is not installed and the tests do not run as root")
    assert response["success"], response["error"]
    assert response["value"] == 6.5  # np_sum([1, 2, 3.5])
    assert "[flashrt] installed numpy with uv in " in response["stdout"]


def test_an_install_by_one_executor_of_a_pool_is_seen_by_the_others(
    venv: Path, tmp_path: Path
) -> None:
    uses = "def f():\n    import os, toolz\n    return [os.getpid(), toolz.__version__]\n"
    install = fn(uses, dependencies=["toolz==0.12.1"])
    (installed,), later = drive(
        venv,
        tmp_path,
        [install],
        [fn(uses), fn(uses)],  # at once: one on each executor of the pool
        settings={"isolation": "process", "executors": "2"},
    )
    assert installed["success"], installed["error"]
    assert installed["stdout"].startswith("[flashrt] installed toolz==0.12.1 with uv in ")
    for answer in later:
        assert answer["success"], answer["error"]
        assert answer["value"][1] == "0.12.1"
        assert answer["stdout"] == ""  # nothing installed again
    pids = {answer["value"][0] for answer in later}
    assert len(pids) == 2 and pids - {installed["value"][0]}  # another executor saw it too
