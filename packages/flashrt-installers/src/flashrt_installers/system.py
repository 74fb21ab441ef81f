"""The system (Debian) package installer plugin: apt-get, or nala for large downloads.

Why it is shaped this way (docs/contracts.md, defect 7):

- what is installed is read from dpkg's status database, so a package already there costs no
  process at all, and is never reinstalled or upgraded (``--no-upgrade``; a pin to another version
  than the installed one is refused rather than carried out);
- ``apt-get update`` runs at most once per worker life, and only when the package lists are
  missing, plus again when an install fails on missing or stale lists (at most once per
  ``FLASHRT_APT_UPDATE_MIN_INTERVAL_S``, so a misspelt name cannot trigger an update per request);
- one install at a time per dpkg database: in this process (an asyncio lock), across the
  executor processes of a worker (an :class:`~.lockfile.InstallLock`, after which what is missing
  is checked again, so a package another executor installed meanwhile is reported, not
  installed twice), and against anything else running dpkg through apt's own lock
  (``DPkg::Lock::Timeout``);
- noninteractive, ``--no-install-recommends``: a request gets what it named, no more.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flashrt_core.hookspecs import hookimpl
from flashrt_core.settings import load_settings

from . import proc
from .lockfile import InstallLock
from .proc import InstallError, describe_failure
from .requirements import (
    DebianPackage,
    installed_debian_packages,
    missing_debian_packages,
    parse_debian_packages,
)
from .settings import InstallerSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from flashrt_core.context import PluginContext
    from flashrt_core.deps import DependencyPlan
    from flashrt_core.protocol import FunctionRequest

__all__ = ["OWNER", "SystemInstaller", "SystemInstallerPlugin"]

T = TypeVar("T")

#: The owner name this plugin claims ``"system"`` under.
OWNER = "flashrt-installers system (apt-get/nala)"
#: Where apt keeps its package lists.
APT_LISTS = Path("/var/lib/apt/lists")

_MISSING_LISTS = re.compile(
    r"Unable to locate package|has no installation candidate|is not available, but is referred"
    r"|Failed to fetch|404\s+Not Found|Version '[^']*' for '[^']*' was not found",
)

#: Monotonic time of this process's last ``apt-get update`` (process-wide: one dpkg database).
_last_update: float | None = None


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DEBIAN_FRONTEND="noninteractive", APT_LISTCHANGES_FRONTEND="none", NEEDRESTART_MODE="a"
    )
    return env


def lists_present(lists_dir: Path = APT_LISTS) -> bool:
    """Whether apt has any package list (images often delete them to save space)."""
    try:
        return any("_Packages" in entry.name for entry in os.scandir(lists_dir))
    except OSError:
        return False


class SystemInstaller:
    """Installs Debian packages with apt-get (or nala); one per runtime."""

    #: apt's package lists; an attribute so a test can point it at an empty directory.
    lists_dir: Path = APT_LISTS

    def __init__(
        self,
        settings: InstallerSettings,
        *,
        run_blocking: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self._run_blocking = run_blocking
        #: Held around every install, across the processes sharing this dpkg database.
        self.install_lock = InstallLock.for_key(
            "system",
            settings.dpkg_status_path,
            f"the system packages (dpkg database {settings.dpkg_status_path})",
        )
        self._stamp = self.install_lock.stamp()
        self._satisfied: set[frozenset[str]] = set()
        self._lock: asyncio.Lock | None = None
        self._status_key: tuple[int, int] | None = None
        self._status: dict[tuple[str, str], str] = {}
        #: Installer commands started (apt-get/nala install and update): diagnostics and tests.
        self.installs = 0
        self.updates = 0

    # -- public --------------------------------------------------------------------------------

    def can_install(self) -> bool:
        """Root and apt-get present: the only case where anything can be installed."""
        return os.geteuid() == 0 and shutil.which("apt-get") is not None

    async def ensure(self, pkgs: Sequence[DebianPackage], accelerate: bool = True) -> bool:
        """Make sure ``pkgs`` are installed; ``True`` when this call installed something."""
        key = frozenset(p.spec for p in pkgs)
        self._catch_up()
        if key in self._satisfied:
            return False
        missing = await self._missing(pkgs)
        if not missing:
            self._satisfied.add(key)
            return False
        if not self.can_install():
            why = "the worker is not root" if os.geteuid() != 0 else "apt-get is not available"
            raise InstallError(
                f"system dependencies not installed: {', '.join(p.spec for p in missing)}; "
                f"{why}, so they cannot be installed here (add them to the image)"
            )
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            missing = await self._missing(pkgs)  # a concurrent request may have installed them
            if not missing:
                self._satisfied.add(key)
                return False
            async with self.install_lock.hold(self.settings.install_timeout_s) as waited:
                return await self._install_missing(key, pkgs, missing, accelerate, waited)

    # -- internals -----------------------------------------------------------------------------

    async def _install_missing(
        self,
        key: frozenset[str],
        pkgs: Sequence[DebianPackage],
        missing: list[DebianPackage],
        accelerate: bool,
        waited: float,
    ) -> bool:
        """Install what is still missing; runs holding the install lock."""
        self._catch_up()
        before = missing
        missing = await self._missing(pkgs)  # another process may have installed them
        if not missing:
            self._satisfied.add(key)
            print(
                f"[flashrt] {', '.join(p.spec for p in before)} already installed by another "
                f"process (waited {waited:.2f} s)"
            )
            return False
        specs = [p.spec for p in missing]
        start = time.monotonic()
        try:
            tool, notes = await self._install(specs, accelerate)
        finally:
            self.install_lock.bump()
            self._stamp = self.install_lock.stamp()
            self._satisfied.clear()
            self._status_key = None
        still = await self._missing(pkgs)
        if still:
            raise InstallError(
                f"{tool} reported success but these are still not installed: "
                + ", ".join(p.spec for p in still)
            )
        self._satisfied.add(key)
        seconds = time.monotonic() - start
        extra = f" ({'; '.join(notes)})" if notes else ""
        print(f"[flashrt] installed {', '.join(specs)} with {tool} in {seconds:.2f} s{extra}")
        return True

    def _catch_up(self) -> None:
        """After another process's install, check every set again (one ``stat``)."""
        stamp = self.install_lock.stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._satisfied.clear()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self._run_blocking is not None:
            result: T = await self._run_blocking(fn, *args)
            return result
        return await asyncio.to_thread(fn, *args)

    def _read_status(self) -> dict[tuple[str, str], str]:
        path = Path(self.settings.dpkg_status_path)
        try:
            st = path.stat()
        except OSError as exc:
            raise InstallError(
                f"cannot read dpkg's status database {path} ({exc.strerror}): system "
                "dependencies need a Debian-based image"
            ) from None
        key = (st.st_mtime_ns, st.st_size)
        if key != self._status_key:
            self._status = installed_debian_packages(path.read_text("utf-8", "replace"))
            self._status_key = key
        return self._status

    async def _missing(self, pkgs: Sequence[DebianPackage]) -> list[DebianPackage]:
        installed = await self._blocking(self._read_status)
        missing = missing_debian_packages(pkgs, installed)
        clashing = [p for p in missing if p.version and _installed_versions(p, installed)]
        if clashing:
            raise InstallError(
                "flashrt never changes installed system packages; requested "
                + ", ".join(
                    f"{p.spec} but {'/'.join(_installed_versions(p, installed))} is installed"
                    for p in clashing
                )
            )
        return missing

    async def _run(self, argv: list[str], what: Sequence[str]) -> proc.ProcResult:
        try:
            return await proc.run_with_retry(
                argv,
                timeout_s=self.settings.install_timeout_s,
                tail_bytes=self.settings.output_tail_bytes,
                env=_apt_env(),
                retry_delay_s=self.settings.retry_delay_s,
            )
        except OSError as exc:
            raise InstallError(
                f"could not start {argv[0]} to install {', '.join(what)}: {exc}"
            ) from exc

    async def _update(self, specs: Sequence[str]) -> float:
        global _last_update
        self.updates += 1
        result = await self._run(
            [
                "apt-get",
                "update",
                "-q",
                "-o",
                f"DPkg::Lock::Timeout={self.settings.apt_lock_timeout_s}",
            ],
            specs,
        )
        _last_update = time.monotonic()
        if not result.ok:
            raise InstallError(describe_failure("apt-get update", specs, result))
        return result.seconds

    def _apt_install_argv(self, specs: Sequence[str]) -> list[str]:
        return [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-upgrade",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "-o",
            f"DPkg::Lock::Timeout={self.settings.apt_lock_timeout_s}",
            "--",
            *specs,
        ]

    async def _install(self, specs: list[str], accelerate: bool) -> tuple[str, list[str]]:
        notes: list[str] = []
        if _last_update is None and not lists_present(self.lists_dir):
            notes.append(f"apt-get update {await self._update(specs):.1f} s")
        if accelerate and await self._wants_nala(specs):
            self.installs += 1
            result = await self._run(
                [
                    "nala",
                    "install",
                    "--assume-yes",
                    "--no-install-recommends",
                    "--raw-dpkg",
                    *specs,
                ],
                specs,
            )
            if result.ok:
                return "nala", notes
            notes.append(f"nala failed (exit {result.returncode}), fell back to apt-get")
        self.installs += 1
        result = await self._run(self._apt_install_argv(specs), specs)
        if not result.ok and not result.timed_out and _MISSING_LISTS.search(result.output):
            interval = self.settings.apt_update_min_interval_s
            if _last_update is None or time.monotonic() - _last_update >= interval:
                notes.append(f"apt-get update {await self._update(specs):.1f} s")
                self.installs += 1
                result = await self._run(self._apt_install_argv(specs), specs)
        if not result.ok:
            raise InstallError(describe_failure("apt-get", specs, result))
        return "apt-get", notes

    async def _wants_nala(self, specs: Sequence[str]) -> bool:
        """nala is present and some requested package's download reaches the threshold."""
        if shutil.which("nala") is None:
            return False
        result = await self._run(["apt-cache", "show", "--no-all-versions", "--", *specs], specs)
        if not result.ok:
            return False
        limit = self.settings.apt_nala_min_mb * 1024 * 1024
        sizes = [int(m) for m in re.findall(r"^Size: (\d+)$", result.output, re.MULTILINE)]
        return any(size >= limit for size in sizes)


def _installed_versions(pkg: DebianPackage, installed: Mapping[tuple[str, str], str]) -> list[str]:
    return [
        version
        for (name, arch), version in installed.items()
        if name == pkg.name and (pkg.arch is None or arch in (pkg.arch, "all"))
    ]


class SystemInstallerPlugin:
    """``system-installer``: claims ``"system"``. One per plugin manager (the entry point names
    the class), owning its :class:`SystemInstaller`; ``settings`` default to the environment's.
    """

    def __init__(self, settings: InstallerSettings | None = None) -> None:
        self._settings = settings
        #: Made on the first request with system dependencies (``None`` until then).
        self.installer: SystemInstaller | None = None

    @property
    def settings(self) -> InstallerSettings:
        if self._settings is None:
            self._settings = load_settings(InstallerSettings)
        return self._settings

    def installer_for(self, context: PluginContext) -> SystemInstaller:
        """The plugin's installer, made on first use with the context's thread pool."""
        if self.installer is None:
            self.installer = SystemInstaller(self.settings, run_blocking=context.run_blocking)
        return self.installer

    @hookimpl(trylast=True)
    def flashrt_resolve_deps(
        self, request: FunctionRequest, plan: DependencyPlan, context: PluginContext
    ) -> None:
        """Claim ``"system"`` unless a plugin asked earlier did; validate every name first."""
        if not plan.system or plan.is_claimed("system"):
            return
        pkgs = parse_debian_packages(plan.system)
        installer = self.installer_for(context)
        accelerate = plan.accelerate_downloads

        async def run() -> bool:
            return await installer.ensure(pkgs, accelerate)

        plan.claim("system", OWNER, run, packages=tuple(p.spec for p in pkgs))
