"""The system installer through Runtime.execute.

One test installs a real Debian package with the real apt-get (root only). The others run a
stand-in ``apt-get`` (a real executable that records its arguments and environment and appends to
a private dpkg status file) so update, retry, serialisation and nala choices can be checked
without touching the machine's packages.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_installers import proc
from flashrt_installers import system as system_plugin

if TYPE_CHECKING:
    from flashrt_core.runtime import Runtime

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("apt-get") is None,
        reason="system installs need root and apt-get",
    ),
]

Body = Callable[..., dict[str, Any]]

STATUS = "Package: coreutils\nStatus: install ok installed\nArchitecture: amd64\nVersion: 9.1-1\n\n"


class FakeApt:
    """Paths of the stand-in's files: its call log, event log, status db and lists directory."""

    def __init__(self, root: Path) -> None:
        self.log = root / "apt.log"
        self.events = root / "events.log"
        self.status = root / "status"
        self.lists = root / "lists"
        self.updated = root / "updated"
        self.hide_until_update = root / "hide-until-update"
        self.status.write_text(STATUS)
        self.lists.mkdir()

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake_apt(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> FakeApt:
    monkeypatch.setattr(system_plugin, "_last_update", None)
    monkeypatch.setattr(system_plugin.SystemInstaller, "lists_dir", tmp_path / "lists")
    fake = FakeApt(tmp_path)
    record = f'echo "$(basename $0) $DEBIAN_FRONTEND $*" >> {fake.log}\n'
    install = f"""
echo start >> {fake.events}; sleep 0.2
after=0
for a in "$@"; do
  if [ $after = 1 ]; then
    if [ -e {fake.hide_until_update} ] && [ ! -e {fake.updated} ]; then
      echo "E: Unable to locate package $a"; echo end >> {fake.events}; exit 100
    fi
    case "$a" in flashrt-no-such-*) echo "E: Unable to locate package $a"; exit 100;; esac
    printf 'Package: %s\\nStatus: install ok installed\\nArchitecture: amd64\\nVersion: 1.0\\n\\n' \
      "${{a%%=*}}" >> {fake.status}
  fi
  [ "$a" = "--" ] && after=1
done
echo end >> {fake.events}
"""
    fake_bin(
        "apt-get",
        record + f'case "$1" in update) touch {fake.updated};; install) {install};; esac\n',
    )
    return fake


def _installer(runtime: Runtime) -> system_plugin.SystemInstaller:
    """The runtime's system installer, owned by its plugin (one per runtime)."""
    found = [
        p for p in runtime.pm.get_plugins() if isinstance(p, system_plugin.SystemInstallerPlugin)
    ]
    assert len(found) == 1, found
    return found[0].installer_for(runtime.context)


def _runtime(make_runtime: Callable[..., Runtime], fake: FakeApt, **settings: Any) -> Runtime:
    return make_runtime(dpkg_status_path=str(fake.status), **settings)


def test_missing_packages_are_installed_noninteractively_without_recommends_or_upgrades(
    make_runtime: Callable[..., Runtime], fake_apt: FakeApt, body: Body
) -> None:
    runtime = _runtime(make_runtime, fake_apt)

    async def main() -> list[Any]:
        return [
            await runtime.execute(body(system_dependencies=["flashrt-fake-a"])),
            await runtime.execute(body(system_dependencies=["coreutils", "flashrt-fake-b=1.0"])),
            await runtime.execute(body(system_dependencies=["flashrt-fake-a"])),
        ]

    first, second, third = asyncio.run(main())
    assert first.success and second.success and third.success
    calls = fake_apt.calls()
    # The lists directory is empty: one update before the first install, never again.
    assert calls[0] == "apt-get noninteractive update -q -o DPkg::Lock::Timeout=120"
    assert calls[1].startswith(
        "apt-get noninteractive install -y -q --no-install-recommends --no-upgrade "
    )
    assert calls[1].endswith(" -- flashrt-fake-a")
    assert calls[2].endswith(" -- flashrt-fake-b=1.0")  # coreutils is installed: not passed
    assert len(calls) == 3  # the third request found everything installed
    assert first.stdout.startswith("[flashrt] installed flashrt-fake-a with apt-get in ")
    assert "apt-get update" in first.stdout
    assert second.stdout.startswith("[flashrt] installed flashrt-fake-b=1.0 with apt-get in ")
    assert third.stdout == ""


def test_one_dpkg_operation_at_a_time_and_one_install_per_package(
    make_runtime: Callable[..., Runtime], fake_apt: FakeApt, body: Body
) -> None:
    (fake_apt.lists / "deb_dists_x_Packages").touch()  # lists present: no update
    runtime = _runtime(make_runtime, fake_apt)

    async def main() -> list[Any]:
        return await asyncio.gather(
            runtime.execute(body(system_dependencies=["flashrt-fake-c"])),
            runtime.execute(body(system_dependencies=["flashrt-fake-d"])),
            runtime.execute(body(system_dependencies=["flashrt-fake-c"])),
        )

    responses = asyncio.run(main())
    assert all(r.success for r in responses), [r.error for r in responses]
    assert fake_apt.events.read_text().split() == ["start", "end", "start", "end"]
    installs = [c for c in fake_apt.calls() if " install " in c]
    assert len(installs) == 2 and not any(" update " in c for c in fake_apt.calls())


def test_stale_lists_get_one_update_and_a_retry(
    make_runtime: Callable[..., Runtime], fake_apt: FakeApt, body: Body
) -> None:
    (fake_apt.lists / "deb_dists_x_Packages").touch()
    fake_apt.hide_until_update.touch()
    runtime = _runtime(make_runtime, fake_apt)
    response = asyncio.run(runtime.execute(body(system_dependencies=["flashrt-fake-e"])))
    assert response.success, response.error
    verbs = [c.split()[2] for c in fake_apt.calls()]
    assert verbs == ["install", "update", "install"]
    # A name that does not exist fails clearly, without yet another update (one per interval).
    response = asyncio.run(runtime.execute(body(system_dependencies=["flashrt-no-such-pkg"])))
    assert not response.success
    assert "apt-get failed with exit code 100" in response.error
    assert "installing flashrt-no-such-pkg" in response.error
    assert "Unable to locate package flashrt-no-such-pkg" in response.error
    assert [c.split()[2] for c in fake_apt.calls()].count("update") == 1


def test_nala_for_large_downloads_when_accelerated_with_fallback_to_apt_get(
    make_runtime: Callable[..., Runtime],
    fake_apt: FakeApt,
    fake_bin: Callable[[str, str], Path],
    body: Body,
    tmp_path: Path,
) -> None:
    (fake_apt.lists / "deb_dists_x_Packages").touch()
    fake_bin("apt-cache", 'echo "Package: $4"; echo "Size: 209715200"\n')
    nala_fails = tmp_path / "nala-fails"
    fake_bin(
        "nala",
        f'echo "nala $*" >> {fake_apt.log}\n[ -e {nala_fails} ] && exit 1\n'
        f'for a in "$@"; do case "$a" in -*|install) ;; *) printf "Package: %s\\nStatus: '
        f'install ok installed\\nArchitecture: amd64\\nVersion: 1\\n\\n" "$a" >> '
        f"{fake_apt.status};; esac; done\n",
    )
    runtime = _runtime(make_runtime, fake_apt)

    async def main() -> list[Any]:
        big = await runtime.execute(body(system_dependencies=["flashrt-big-a"]))
        plain = await runtime.execute(
            body(system_dependencies=["flashrt-big-b"], accelerate_downloads=False)
        )
        nala_fails.touch()
        fallback = await runtime.execute(body(system_dependencies=["flashrt-big-c"]))
        return [big, plain, fallback]

    big, plain, fallback = asyncio.run(main())
    assert big.success and plain.success and fallback.success
    assert "with nala" in big.stdout
    assert "with apt-get" in plain.stdout
    assert "nala failed (exit 1), fell back to apt-get" in fallback.stdout
    tools = [c.split()[0] + ":" + c.split()[-1] for c in fake_apt.calls()]
    assert tools == [
        "nala:flashrt-big-a",
        "apt-get:flashrt-big-b",
        "nala:flashrt-big-c",
        "apt-get:flashrt-big-c",
    ]


def test_a_pin_to_another_version_of_an_installed_package_is_refused_without_a_process(
    make_runtime: Callable[..., Runtime], body: Body
) -> None:
    runtime = make_runtime()
    started = proc.STATS.started
    response = asyncio.run(runtime.execute(body(system_dependencies=["coreutils=0.1-1"])))
    assert not response.success
    assert "never changes installed system packages" in response.error
    assert "coreutils=0.1-1 but" in response.error
    assert proc.STATS.started == started


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_apt_install_and_installed_packages_left_alone(
    make_runtime: Callable[..., Runtime], body: Body, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(system_plugin, "_last_update", None)
    package = "hello"  # GNU hello: 53 kB, depends only on libc6
    subprocess.run(["dpkg", "-r", package], capture_output=True, check=False)
    status = Path("/var/lib/dpkg/status")
    try:
        runtime = make_runtime()
        response = asyncio.run(
            runtime.execute(
                body(
                    function_code="def f():\n    import subprocess\n"
                    "    return subprocess.run(['hello'], capture_output=True, text=True).stdout\n",
                    system_dependencies=[package, "coreutils"],
                )
            )
        )
        assert response.success, response.error
        assert response.json_result.strip() == "Hello, world!"
        assert response.stdout.startswith(f"[flashrt] installed {package} with apt-get in ")
        # Already installed now, like coreutils: no process, no dpkg change, nothing printed.
        before = (status.stat().st_mtime_ns, proc.STATS.started)
        for deps in ([package], ["coreutils"], ["coreutils", package]):
            fresh = make_runtime()  # a new worker: no memory of earlier answers
            response = asyncio.run(fresh.execute(body(system_dependencies=deps)))
            assert response.success and response.stdout == ""
        assert (status.stat().st_mtime_ns, proc.STATS.started) == before
    finally:
        subprocess.run(["dpkg", "-r", package], capture_output=True, check=False)


def test_a_package_another_process_installed_while_this_one_waited_is_reported_not_installed(
    make_runtime: Callable[..., Runtime], fake_apt: FakeApt, body: Body
) -> None:
    (fake_apt.lists / "deb_dists_x_Packages").touch()
    runtime = _runtime(make_runtime, fake_apt)
    lock = _installer(runtime).install_lock
    lock.path.parent.mkdir(parents=True, exist_ok=True)

    async def main() -> Any:
        other = os.open(lock.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)  # another executor is running apt-get
            pending = asyncio.ensure_future(
                runtime.execute(body(system_dependencies=["flashrt-fake-e"]))
            )
            await asyncio.sleep(0.3)
            assert not pending.done()
            with fake_apt.status.open("a") as fh:
                fh.write(
                    "Package: flashrt-fake-e\nStatus: install ok installed\n"
                    "Architecture: amd64\nVersion: 1.0\n\n"
                )
            os.write(other, b".")
        finally:
            os.close(other)
        return await pending

    response = asyncio.run(main())
    assert response.success, response.error
    assert response.stdout.startswith(
        "[flashrt] flashrt-fake-e already installed by another process (waited "
    ), response.stdout
    assert fake_apt.calls() == []
