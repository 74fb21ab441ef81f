"""Installing what a deployed app's import misses: which distribution, and the loop's bounds.

The installs here write the missing module into a directory on ``sys.path`` (what an installer
leaves behind); real installs through the installer plugins are in
``tests/test_deployed_autoinstall.py``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core.autoinstall import MAX_MODULES, MissingPackage, import_installing
from flashrt_core.distributions import distribution_for, module_key
from flashrt_core.startup import StartupBound, StartupTimeout

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("flashrt.test")


@pytest.mark.parametrize(
    ("name", "key", "distribution"),
    [
        ("cv2", "cv2", "opencv-python"),
        ("PIL.Image", "PIL", "pillow"),
        ("sklearn.linear_model", "sklearn", "scikit-learn"),
        ("yaml", "yaml", "pyyaml"),
        ("google.protobuf", "google.protobuf", "protobuf"),
        ("google.protobuf.message", "google.protobuf", "protobuf"),
        ("termcolor", "termcolor", "termcolor"),
        ("termcolor.sub", "termcolor", "termcolor"),
    ],
)
def test_the_distribution_of_a_module(name: str, key: str, distribution: str) -> None:
    assert module_key(name) == key
    assert distribution_for(key) == distribution


@pytest.mark.parametrize("name", ["google", "google.auth", ""])
def test_a_shared_namespace_alone_names_no_distribution(name: str) -> None:
    assert module_key(name) is None


class Site:
    """An app directory importing ``wanted`` modules, and a site where installs land."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *wanted: str) -> None:
        self.app = tmp_path / "app"
        self.site = tmp_path / "site"
        self.app.mkdir()
        self.site.mkdir()
        tag = tmp_path.name.replace("-", "_")
        self.entry = f"flashrt_t_entry_{tag}"
        self.names = [f"flashrt_t_{name}_{tag}" for name in wanted]
        (self.app / f"{self.entry}.py").write_text(
            "".join(f"import {name}\n" for name in self.names) + "VALUE = 42\n"
        )
        monkeypatch.syspath_prepend(str(self.app))
        monkeypatch.syspath_prepend(str(self.site))
        for name in [self.entry, *self.names]:
            monkeypatch.delitem(sys.modules, name, raising=False)
        self.installs: list[str] = []
        self.monkeypatch = monkeypatch

    async def load(self) -> Any:
        return await asyncio.to_thread(importlib.import_module, self.entry)

    async def install(self, distribution: str) -> bool:
        self.installs.append(distribution)
        (self.site / f"{distribution}.py").write_text("")
        self.monkeypatch.delitem(sys.modules, distribution, raising=False)
        return True

    async def run(
        self, install: Any = None, bound: StartupBound | None = None, what: str = "importing"
    ) -> Any:
        return await import_installing(
            self.load,
            install or self.install,
            app_dir=self.app,
            bound=bound or StartupBound(0, 0, log),
            what=what,
        )


def test_each_missing_module_is_installed_then_the_import_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site = Site(tmp_path, monkeypatch, "alpha", "beta")
    caplog.set_level(logging.INFO, "flashrt.deployed")
    module = asyncio.run(site.run())
    assert module.VALUE == 42
    assert site.installs == site.names
    lines = [r.getMessage() for r in caplog.records if r.name == "flashrt.deployed"]
    assert len(lines) == 2
    assert lines[0].startswith(f"installed {site.names[0]} for the missing module ")


def test_a_module_is_installed_for_once_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch, "alpha")
    calls: list[str] = []

    async def provides_nothing(distribution: str) -> bool:
        calls.append(distribution)
        return False  # "already installed", yet the module is not there

    with pytest.raises(MissingPackage) as caught:
        asyncio.run(site.run(provides_nothing, what="importing app.py"))
    assert calls == site.names
    assert str(caught.value) == (
        f"importing app.py failed: No module named '{site.names[0]}', although "
        f"'{site.names[0]}' is installed for it"
    )


def test_at_most_five_modules_are_installed_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch, *(f"m{i}" for i in range(MAX_MODULES + 1)))
    with pytest.raises(MissingPackage, match=f"No module named '{site.names[-1]}'; 5 missing"):
        asyncio.run(site.run())
    assert site.installs == site.names[:MAX_MODULES]


def test_an_install_that_fails_names_the_module_the_distribution_and_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch, "alpha")

    async def fails(distribution: str) -> bool:
        raise MissingPackage(f"uv: no {distribution} in the index")

    with pytest.raises(MissingPackage) as caught:
        asyncio.run(site.run(fails, what="importing app.py"))
    name = site.names[0]
    assert str(caught.value) == (
        f"importing app.py failed: No module named '{name}', and installing the distribution "
        f"'{name}' for it failed: uv: no {name} in the index"
    )


def test_a_module_of_the_app_itself_is_not_installed_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch)
    package = f"flashrt_t_pkg_{tmp_path.name.replace('-', '_')}"
    (site.app / package).mkdir()
    (site.app / package / "__init__.py").write_text("")
    (site.app / f"{site.entry}.py").write_text(f"import {package}.missing\n")
    monkeypatch.delitem(sys.modules, package, raising=False)
    with pytest.raises(ModuleNotFoundError, match=f"No module named '{package}.missing'"):
        asyncio.run(site.run())
    assert site.installs == []


def test_installs_count_within_the_start_up_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch, "alpha")

    async def slow(distribution: str) -> bool:
        await asyncio.sleep(5)
        return True

    with pytest.raises(StartupTimeout, match=r"still installing flashrt_t_alpha_\w+ for the"):
        asyncio.run(site.run(slow, StartupBound(0.5, 0, log)))
