"""The Python installer through Runtime.execute, inside the workspace interpreter.

Real installs happen in test_venv_installs.py (a throwaway venv); here a stand-in ``uv`` (a real
executable that records how it was called) keeps the workspace environment untouched while the
plugin's own behaviour is exercised: validation, fast path, single flight, serialisation, errors,
time limits and the compiler recovery.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import get_plugin_manager, hookimpl
from flashrt_core.runtime import Runtime
from flashrt_installers import proc
from flashrt_installers import python as python_plugin
from flashrt_installers.python import PythonInstaller, PythonInstallerPlugin

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)

Body = Callable[..., dict[str, Any]]


def _fake_uv(fake_bin: Callable[[str, str], Path], log: Path, body: str = "") -> Path:
    """A uv stand-in: logs 'start <args>' and 'end' around ``body``; exits with body's status."""
    return fake_bin(
        "uv",
        f'echo "start $*" >> {log}\n{body}\nstatus=$?\necho "end" >> {log}\nexit $status\n',
    )


@pytest.fixture
def uv_log(tmp_path: Path) -> Path:
    return tmp_path / "uv.log"


def _plugin(runtime: Runtime) -> PythonInstallerPlugin:
    """The runtime's Python installer plugin (each runtime has an instance of its own)."""
    found = [p for p in runtime.pm.get_plugins() if isinstance(p, PythonInstallerPlugin)]
    assert len(found) == 1, found
    return found[0]


def _installer(runtime: Runtime) -> PythonInstaller:
    return _plugin(runtime).installer_for(runtime.context)


def test_entry_points_register_both_installers() -> None:
    from flashrt_installers.system import SystemInstallerPlugin

    pm = get_plugin_manager()
    names = dict(pm.list_name_plugin())
    assert isinstance(names["python-installer"], PythonInstallerPlugin)
    assert isinstance(names["system-installer"], SystemInstallerPlugin)
    # The entry points name the classes: each manager (each runtime, each executor) gets
    # instances of its own, which own their installers.
    again = dict(get_plugin_manager().list_name_plugin())
    assert again["python-installer"] is not names["python-installer"]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("dependencies", "--index-url=http://x"),
        ("dependencies", "-e ."),
        ("dependencies", "numpy; rm -rf /"),
        ("dependencies", "pkg name"),
        ("dependencies", "../x"),
        ("system_dependencies", "-o foo"),
        ("system_dependencies", "../x"),
        ("system_dependencies", "libgl1; rm -rf /"),
    ],
)
def test_rejections_name_the_string_and_start_no_process(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    tmp_path: Path,
    field: str,
    bad: str,
) -> None:
    sentinel = tmp_path / "an-installer-ran"
    uv = fake_bin("uv", f"touch {sentinel}\n")
    fake_bin("apt-get", f"touch {sentinel}\n")
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")
    started = proc.STATS.started
    # A valid, missing package next to the bad one: nothing may run for it either.
    other = "system_dependencies" if field == "dependencies" else "dependencies"
    fields = {
        field: ["flashrt-not-installed-xyz", bad] if field == "dependencies" else [bad],
        other: ["flashrt-not-installed-xyz"] if other == "dependencies" else ["hello"],
    }
    response = asyncio.run(runtime.execute(body(**fields)))
    assert not response.success
    assert repr(bad) in response.error
    assert "failed during dependencies" in response.error
    assert proc.STATS.started == started
    assert not sentinel.exists()


def test_satisfied_dependencies_start_no_process_and_print_nothing(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    tmp_path: Path,
) -> None:
    sentinel = tmp_path / "an-installer-ran"
    uv = fake_bin("uv", f"touch {sentinel}\n")
    fake_bin("apt-get", f"touch {sentinel}\n")
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")
    started = proc.STATS.started
    request = body(
        dependencies=["pluggy>=1", "MsgSpec", 'nothing-here-xyz; python_version < "3"'],
        system_dependencies=["coreutils"],
    )

    async def main() -> list[Any]:
        return [await runtime.execute(request) for _ in range(3)]

    for response in asyncio.run(main()):
        assert response.success, response.error
        assert response.json_result == 1
        assert response.stdout == ""
    assert proc.STATS.started == started and not sentinel.exists()


class CondaLike:
    """A third-party installer that takes over Python packages and leaves system ones alone."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    @hookimpl
    def flashrt_resolve_deps(self, request: Any, plan: Any, context: Any) -> None:
        if not plan.python:
            return
        packages = plan.python

        async def install() -> bool:
            self.seen.append(packages)
            print(f"conda-like: would install {', '.join(packages)}")
            return False

        plan.claim("python", "conda-like", install)


def test_a_third_party_plugin_replaces_the_python_installer_only(
    fake_bin: Callable[[str, str], Path], body: Body, tmp_path: Path
) -> None:
    from flashrt_installers.system import SystemInstallerPlugin

    sentinel = tmp_path / "an-installer-ran"
    fake_bin("uv", f"touch {sentinel}\n")
    conda = CondaLike()
    # Registered *before* the built-in installers: trylast still lets it claim first.
    from flashrt_core import Settings

    pm = get_plugin_manager(
        Settings(disable_plugin_autoload=True),
        extra_plugins=(PythonInstallerPlugin(), SystemInstallerPlugin(), conda),
    )
    # One interpreter: the plugin object records what it saw, and this test reads it back.
    runtime = Runtime(Settings(disable_plugin_autoload=True, isolation="none"), plugin_manager=pm)
    started = proc.STATS.started
    response = asyncio.run(
        runtime.execute(
            body(dependencies=["some-conda-only-package>=2"], system_dependencies=["coreutils"])
        )
    )
    assert response.success, response.error
    assert conda.seen == [("some-conda-only-package>=2",)]
    assert "conda-like: would install some-conda-only-package>=2" in response.stdout
    assert proc.STATS.started == started and not sentinel.exists()
    # The system installer still ran its (fast-path) check: a bad name is still refused.
    response = asyncio.run(runtime.execute(body(system_dependencies=["-o foo"])))
    assert not response.success and "'-o foo'" in response.error


def test_concurrent_requests_share_one_install_and_other_work_proceeds(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    uv_log: Path,
) -> None:
    release = uv_log.with_suffix(".go")
    uv = _fake_uv(fake_bin, uv_log, f"while [ ! -e {release} ]; do sleep 0.02; done")
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")
    installer = _installer(runtime)
    request = body(dependencies=["flashrt-new-dep-xyz==1.0"])

    async def main() -> tuple[Any, Any, Any]:
        first = asyncio.ensure_future(runtime.execute(request))
        second = asyncio.ensure_future(runtime.execute(request))
        while not uv_log.exists():
            await asyncio.sleep(0.01)
        # The install is blocked in its subprocess: another request runs to completion meanwhile.
        plain = await runtime.execute(body())
        assert not first.done() and not second.done()
        release.touch()
        return plain, await first, await second

    plain, first, second = asyncio.run(main())
    assert plain.success and plain.json_result == 1
    assert first.success and second.success, (first.error, second.error)
    assert installer.installs == 1
    assert uv_log.read_text().count("start ") == 1
    leader, follower = sorted([first.stdout, second.stdout], key=lambda out: "concurrent" in out)
    assert leader.startswith("[flashrt] installed flashrt-new-dep-xyz==1.0 with uv in "), leader
    assert "flashrt-new-dep-xyz==1.0 installed by a concurrent request with uv" in follower


def test_different_sets_install_one_after_the_other(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    uv_log: Path,
) -> None:
    uv = _fake_uv(fake_bin, uv_log, "sleep 0.3")
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")

    async def main() -> list[Any]:
        return await asyncio.gather(
            runtime.execute(body(dependencies=["flashrt-set-a-xyz"])),
            runtime.execute(body(dependencies=["flashrt-set-b-xyz"])),
        )

    responses = asyncio.run(main())
    assert all(r.success for r in responses)
    events = [line.split(" ", 1)[0] for line in uv_log.read_text().splitlines()]
    assert events == ["start", "end", "start", "end"]  # never two installers at once
    # The argument list: the running interpreter, then '--', then normalised requirements.
    first = uv_log.read_text().splitlines()[0].split()
    assert first[1:5] == ["pip", "install", "--python", sys.executable]
    assert first[-2] == "--" and first[-1] in ("flashrt-set-a-xyz", "flashrt-set-b-xyz")


def test_install_failure_names_packages_and_quotes_the_output_tail(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    uv_log: Path,
) -> None:
    noise = "for i in $(seq 1 3000); do echo resolving step $i; done"
    uv = _fake_uv(
        fake_bin,
        uv_log,
        f"{noise}\necho '  x No solution found when resolving: flashrt-bad-xyz' >&2\nfalse",
    )
    runtime = make_runtime(uv_path=str(uv), python_installer="uv", output_tail_bytes=2048)
    response = asyncio.run(runtime.execute(body(dependencies=["flashrt-bad-xyz>=9"])))
    assert not response.success
    error = response.error
    assert "could not install flashrt-bad-xyz>=9" in error
    assert "uv failed with exit code 1" in error
    assert "No solution found when resolving: flashrt-bad-xyz" in error
    assert "resolving step 1\n" not in error  # only the tail is kept
    assert "earlier bytes of output dropped" in error


def test_install_time_limit_kills_the_installer(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    tmp_path: Path,
    uv_log: Path,
) -> None:
    pidfile = tmp_path / "child.pid"
    uv = _fake_uv(fake_bin, uv_log, f"sleep 60 & echo $! > {pidfile}; wait")
    runtime = make_runtime(uv_path=str(uv), python_installer="uv", install_timeout_s=0.5)
    response = asyncio.run(runtime.execute(body(dependencies=["flashrt-slow-xyz"])))
    assert not response.success
    assert "timed out after" in response.error and "process group was killed" in response.error
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(") ", 1)[1][0] == "Z":
                break
        asyncio.run(asyncio.sleep(0.05))
    else:
        pytest.fail("the installer's child survived the time limit")


@pytest.mark.skipif(os.geteuid() != 0, reason="installing build-essential needs root")
def test_a_build_without_a_compiler_gets_build_essential_once_and_a_retry(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    tmp_path: Path,
    uv_log: Path,
) -> None:
    tried = tmp_path / "tried"
    uv = _fake_uv(
        fake_bin,
        uv_log,
        f"if [ -e {tried} ]; then exit 0; fi; touch {tried}\n"
        "echo \"error: command 'gcc' failed: No such file or directory\"; false",
    )
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")
    installer = _installer(runtime)
    response = asyncio.run(runtime.execute(body(dependencies=["flashrt-needs-cc-xyz"])))
    assert response.success, response.error
    assert installer.installs == 2
    assert "after installing build-essential" in response.stdout
    # build-essential is tried once per worker: a second compiler failure is reported as such.
    tried.unlink()
    response = asyncio.run(runtime.execute(body(dependencies=["flashrt-needs-cc-2-xyz"])))
    assert not response.success
    assert "no C compiler was found" in response.error
    assert installer.installs == 3


def test_python_validation_happens_in_the_hook_before_any_claim(
    make_runtime: Callable[..., Runtime], body: Body
) -> None:
    runtime = make_runtime()
    from flashrt_core import DependencyPlan

    plan = DependencyPlan(python=("ok-pkg", "-e ."))
    with pytest.raises(ValueError, match=re.escape("'-e .'")):
        _plugin(runtime).flashrt_resolve_deps(request=None, plan=plan, context=runtime.context)
    assert not plan.is_claimed("python")


def test_accelerated_requests_turn_on_hf_transfer_once_it_is_importable(
    make_runtime: Callable[..., Runtime],
    body: Body,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_ENABLE_HF_TRANSFER", raising=False)
    runtime = make_runtime()
    plain = body(dependencies=["pluggy"], accelerate_downloads=False)
    accelerated = body(dependencies=["pluggy"])
    assert asyncio.run(runtime.execute(accelerated)).success
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in os.environ  # hf_transfer is not installed here
    (tmp_path / "hf_transfer.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    runtime = make_runtime()
    assert asyncio.run(runtime.execute(plain)).success
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in os.environ
    assert asyncio.run(runtime.execute(accelerated)).success
    assert os.environ["HF_HUB_ENABLE_HF_TRANSFER"] == "1"


class FakeEnvironment:
    """``unsatisfied_python_requirements`` over a set of names another process may install."""

    def __init__(self) -> None:
        self.installed: set[str] = set()
        self.checks = 0

    def unsatisfied(self, reqs: Any) -> list[Any]:
        self.checks += 1
        return [r for r in reqs if r.applies() and r.normalized not in self.installed]


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> FakeEnvironment:
    env = FakeEnvironment()
    monkeypatch.setattr(python_plugin, "unsatisfied_python_requirements", env.unsatisfied)
    return env


def test_a_set_another_process_installed_while_this_one_waited_is_reported_not_installed(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    uv_log: Path,
    fake_env: FakeEnvironment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uv = _fake_uv(fake_bin, uv_log)
    runtime = make_runtime(uv_path=str(uv), python_installer="uv")
    installer = _installer(runtime)
    invalidated: list[float] = []
    real_invalidate = python_plugin.importlib.invalidate_caches
    monkeypatch.setattr(
        python_plugin.importlib,
        "invalidate_caches",
        lambda: (invalidated.append(time.monotonic()), real_invalidate())[1],
    )
    lock = installer.install_lock
    lock.path.parent.mkdir(parents=True, exist_ok=True)

    async def main() -> Any:
        other = os.open(lock.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)  # "another process" is installing
            pending = asyncio.ensure_future(
                runtime.execute(body(dependencies=["flashrt-elsewhere-xyz==1"]))
            )
            while fake_env.checks < 1:  # it found the set missing, and waits for the lock
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not pending.done()
            fake_env.installed.add("flashrt-elsewhere-xyz==1")
            os.write(other, b".")  # what an install by another process leaves behind
        finally:
            os.close(other)
        return await pending

    response = asyncio.run(main())
    assert response.success, response.error
    assert re.fullmatch(
        r"\[flashrt\] flashrt-elsewhere-xyz==1 already installed by another process "
        r"\(waited \d+\.\d\d s\)\n",
        response.stdout,
    ), response.stdout
    assert installer.installs == 0 and not uv_log.exists()
    assert invalidated  # this process looks at the environment afresh before importing
    # Remembered: the next request starts nothing and says nothing.
    checks = fake_env.checks
    again = asyncio.run(runtime.execute(body(dependencies=["flashrt-elsewhere-xyz==1"])))
    assert again.success and again.stdout == "" and fake_env.checks == checks


def test_another_process_s_install_makes_the_remembered_sets_be_checked_again(
    make_runtime: Callable[..., Runtime], body: Body, fake_env: FakeEnvironment
) -> None:
    fake_env.installed.add("flashrt-present-xyz")
    runtime = make_runtime()
    installer = _installer(runtime)
    request = body(dependencies=["flashrt-present-xyz"])

    async def main() -> list[Any]:
        first = await runtime.execute(request)
        second = await runtime.execute(request)
        checks = fake_env.checks
        # Another executor installs something (it may have up- or downgraded this package).
        installer.install_lock.path.parent.mkdir(parents=True, exist_ok=True)
        with open(installer.install_lock.path, "ab") as fh:
            fh.write(b".")
        third = await runtime.execute(request)
        return [first, second, third, checks]

    first, second, third, checks = asyncio.run(main())
    assert first.success and second.success and third.success
    assert checks == 1  # the second request was answered from memory
    assert fake_env.checks == 2  # the third looked again: the lock's stamp had changed
    assert installer.installs == 0


def test_waiting_past_the_install_limit_for_another_process_fails_naming_the_lock(
    make_runtime: Callable[..., Runtime],
    fake_bin: Callable[[str, str], Path],
    body: Body,
    uv_log: Path,
) -> None:
    uv = _fake_uv(fake_bin, uv_log)
    runtime = make_runtime(uv_path=str(uv), python_installer="uv", install_timeout_s=0.3)
    lock = _installer(runtime).install_lock
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        response = asyncio.run(runtime.execute(body(dependencies=["flashrt-locked-out-xyz"])))
    finally:
        os.close(fd)
    assert not response.success
    assert "timed out after 0.3 s waiting for another process's install into the Python " in (
        response.error
    )
    assert f"environment {sys.prefix}: the install lock {lock.path} is still taken" in (
        response.error
    )
    assert not uv_log.exists()
