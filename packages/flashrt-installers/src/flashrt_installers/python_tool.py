"""uv or pip for the running interpreter: which tool, its command, and running one install.

Kept apart from the installer's single-flight state (:mod:`.python`), which decides *whether*
and *when* to install; this decides *how*, and owns what it found out on the way:

- packages go into ``sys.executable``'s environment (``uv pip install --python sys.executable``,
  ``sys.executable -m pip``), never into whatever Python is first on PATH (docs/contracts.md,
  defect 6); uv is looked for once, pip bootstrapped from ``ensurepip`` when neither is there;
- an externally managed (PEP 668) interpreter gets ``--break-system-packages`` when allowed;
- a build that found no C compiler is retried once after installing build-essential (at most
  once per runtime, when allowed and possible).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import proc
from .proc import InstallError, describe_failure
from .requirements import DebianPackage

if TYPE_CHECKING:
    from .settings import InstallerSettings

__all__ = ["Command", "PythonTool", "needs_compiler"]

_COMPILER_MISSING = re.compile(
    r"(?:\b|/)(?:x86_64-linux-gnu-|aarch64-linux-gnu-)?(?:gcc|g\+\+|cc|c\+\+)['\"]?:? "
    r"(?:command )?not found"
    r"|No such file or directory: '(?:[\w/.-]*-)?(?:gcc|g\+\+|cc|c\+\+)'"
    r"|unable to execute '[^']*(?:gcc|cc|g\+\+|c\+\+)'"
    r"|error: command '[^']*(?:gcc|cc|g\+\+|c\+\+)' failed: No such file or directory"
    r"|(?:could not|unable to) (?:find|locate) (?:a |any )?(?:C|C\+\+) compiler"
    r"|Unknown compiler\(s\)"
    r"|linker `cc` not found",
    re.IGNORECASE,
)


def needs_compiler(output: str) -> bool:
    """Whether a failed install's output shows a build that found no C/C++ compiler."""
    return _COMPILER_MISSING.search(output) is not None


class Command(NamedTuple):
    """One install command: the tool's name (``uv``/``pip``), its argv, its environment."""

    tool: str
    argv: list[str]
    env: dict[str, str]


class PythonTool:
    """uv or pip installing into ``sys.executable``; one per :class:`~.python.PythonInstaller`.

    ``system``: the system installer, for build-essential when a build needs a compiler.
    """

    def __init__(self, settings: InstallerSettings, *, system: Any = None) -> None:
        self.settings = settings
        self.python = sys.executable
        self._system = system
        self._uv: str | None = None
        self._uv_searched = False
        self._build_essential_tried = False
        #: Installer commands started (uv/pip runs, retries included): diagnostics and tests.
        self.started = 0

    def command(self, requirements: list[str], accelerate: bool) -> Command:
        """The command installing ``requirements``; raises :class:`InstallError` when the
        setting asks for a tool that is not there (or for none it knows)."""
        mode = self.settings.python_installer.strip().lower()
        if mode not in ("auto", "uv", "pip"):
            raise InstallError(
                f"FLASHRT_PYTHON_INSTALLER={self.settings.python_installer!r}: "
                "expected auto, uv or pip"
            )
        uv = self._find_uv() if mode != "pip" else None
        if mode == "uv" and uv is None:
            raise InstallError("FLASHRT_PYTHON_INSTALLER=uv but no uv binary was found")
        has_pip = importlib.util.find_spec("pip") is not None
        use_uv = uv is not None and (mode == "uv" or accelerate or not has_pip)
        env = dict(os.environ)
        extra = ["--break-system-packages"] if self._externally_managed() else []
        if use_uv:
            assert uv is not None
            env["UV_NO_PROGRESS"] = "1"
            argv = [uv, "pip", "install", "--python", self.python, *extra, "--", *requirements]
            return Command("uv", argv, env)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        argv = [
            self.python,
            "-m",
            "pip",
            "install",
            "--no-input",
            "--progress-bar",
            "off",
            *extra,
            "--",
            *requirements,
        ]
        return Command("pip", argv, env)

    async def install(self, command: Command, names: list[str]) -> str:
        """Run ``command`` (pip bootstrapped first if it is missing; once more after installing
        build-essential when the build found no compiler). Returns a note for the install's
        line; raises :class:`InstallError` naming ``names`` (what was missing) when it fails."""
        tool, argv, env = command
        if tool == "pip" and importlib.util.find_spec("pip") is None:
            # No uv and no pip: bootstrap pip from the interpreter's own bundled wheel.
            boot = await self._run([self.python, "-m", "ensurepip", "--default-pip"], env)
            if not boot.ok:
                raise InstallError(describe_failure("ensurepip", ["pip"], boot))
        result = await self._run(argv, env)
        note = ""
        if not result.ok and needs_compiler(result.output) and await self._install_compiler():
            note = " (after installing build-essential for a build that needed a compiler)"
            result = await self._run(argv, env)
        if not result.ok:
            message = describe_failure(tool, names, result)
            if needs_compiler(result.output):
                message += (
                    "\n(a package had to be built from source and no C compiler was found; "
                    "use an image with build-essential or run the worker as root)"
                )
            raise InstallError(message)
        return note

    async def _run(self, argv: list[str], env: dict[str, str]) -> proc.ProcResult:
        self.started += 1
        tool = Path(argv[0]).name
        try:
            result = await proc.run_with_retry(
                argv,
                timeout_s=self.settings.install_timeout_s,
                tail_bytes=self.settings.output_tail_bytes,
                env=env,
                retry_delay_s=self.settings.retry_delay_s,
            )
        except OSError as exc:
            raise InstallError(f"could not start {tool} ({argv[0]}): {exc}") from exc
        if result.attempts > 1:
            self.started += 1
        return result

    async def _install_compiler(self) -> bool:
        """Install build-essential once per runtime, when allowed and possible."""
        if self._build_essential_tried or not self.settings.install_build_essential:
            return False
        self._build_essential_tried = True
        if self._system is None or not self._system.can_install():
            return False
        pkg = DebianPackage(name="build-essential", arch=None, version=None)
        try:
            await self._system.ensure((pkg,), accelerate=False)
        except InstallError as exc:
            print(f"[flashrt] could not install build-essential: {exc}")
            return False
        return True

    def _find_uv(self) -> str | None:
        if self._uv_searched:
            return self._uv
        self._uv_searched = True
        found: str | None = self.settings.uv_path or None
        if found is None:
            try:
                from uv import find_uv_bin

                found = find_uv_bin()
            except Exception:
                found = shutil.which("uv")
        self._uv = found
        return found

    def _externally_managed(self) -> bool:
        if not self.settings.break_system_packages or sys.prefix != sys.base_prefix:
            return False
        stdlib = sysconfig.get_path("stdlib")
        return bool(stdlib) and Path(stdlib, "EXTERNALLY-MANAGED").is_file()
