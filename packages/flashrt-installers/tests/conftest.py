"""Shared fixtures: a Runtime with the installers loaded, and stand-in installer programs.

Stand-ins replace uv/apt-get only where the real one would reach outside the machine's own test
venv or change the workspace environment; they are real executables, run as real processes.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import Runtime, Settings, load_settings
from flashrt_installers import lockfile
from flashrt_installers.python import PythonInstallerPlugin
from flashrt_installers.settings import InstallerSettings
from flashrt_installers.system import SystemInstallerPlugin

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

FUNCTION = "def f():\n    return 1\n"


def _body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "function_name": "f",
        "function_code": FUNCTION,
        "serialization_format": "json",
    }
    body.update(fields)
    return body


@pytest.fixture(autouse=True)
def private_lock_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install lock files go to the test's directory, not the machine's temp dir."""
    directory = tmp_path / "locks"
    monkeypatch.setattr(lockfile, "lock_directory", lambda: directory)
    return directory


@pytest.fixture
def body() -> Callable[..., dict[str, Any]]:
    """Build a minimal JSON-format function request (returns 1) with the given fields on top."""
    return _body


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., Runtime]]:
    """Build Runtimes with only the installers (made with the given installer settings) as
    extra plugins."""
    made: list[Runtime] = []

    def make(*plugins: object, **installer_settings: Any) -> Runtime:
        settings = load_settings(InstallerSettings, {}, **installer_settings)
        runtime = Runtime(
            # One interpreter: these tests hand the plugins fakes and settings and read their
            # installers back; fixture 03 covers installs in an executor.
            Settings(disable_plugin_autoload=True, isolation="none"),
            extra_plugins=(
                *plugins,
                PythonInstallerPlugin(settings),
                SystemInstallerPlugin(settings),
            ),
        )
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.lanes.shutdown()


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], Path]:
    """Write an executable shell script ``name`` into a directory put first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")

    def write(name: str, body: str) -> Path:
        path = bindir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    return write
