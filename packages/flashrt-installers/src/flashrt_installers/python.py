"""The Python package installer plugin: uv (preferred) or pip, into the running interpreter.

Why it is shaped this way (docs/contracts.md, defects 6-8):

- packages go into ``sys.executable``'s environment, never into whatever Python is first on
  PATH: how uv or pip is found and run is :mod:`.python_tool`'s; this module owns *whether* and
  *when* to install (the single-flight state);
- a request whose requirements are all met starts no process: the answer is remembered per
  normalised set, so a warm request pays a set lookup;
- concurrent requests needing the same set share one install; different sets install one after
  the other (two installers writing one site-packages at once can corrupt it), and so do the
  executor processes of one worker, through an :class:`~.lockfile.InstallLock` on
  ``sys.prefix``: what is missing is checked again once it is held, so a set another process
  installed meanwhile is reported, not installed twice;
- after another process's install (the lock's stamp changed), the remembered sets are dropped
  and the import system's caches invalidated before the next request's check, so a package it
  installed, upgraded or downgraded is seen here as it now is;
- an install, once started, finishes (or hits its own time limit) even if the request that
  started it is cancelled: killing pip half-way leaves a broken environment behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar

from flashrt_core.hookspecs import hookimpl
from flashrt_core.settings import load_settings

from .lockfile import InstallLock
from .python_tool import PythonTool
from .requirements import (
    PythonRequirement,
    parse_python_requirements,
    unsatisfied_python_requirements,
)
from .settings import InstallerSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from flashrt_core.context import PluginContext
    from flashrt_core.deps import DependencyPlan
    from flashrt_core.protocol import FunctionRequest

__all__ = ["OWNER", "PythonInstaller", "PythonInstallerPlugin"]

T = TypeVar("T")

#: The owner name this plugin claims ``"python"`` under.
OWNER = "flashrt-installers python (uv/pip)"


@dataclasses.dataclass(frozen=True)
class _Outcome:
    changed: bool
    tool: str = ""
    packages: tuple[str, ...] = ()
    seconds: float = 0.0
    note: str = ""
    #: Nothing was left to install once the install lock was held: another process did it.
    elsewhere: bool = False


class PythonInstaller:
    """Installs PEP 508 requirements into the running interpreter; one per runtime."""

    def __init__(
        self,
        settings: InstallerSettings,
        *,
        run_blocking: Callable[..., Awaitable[Any]] | None = None,
        system: Any = None,
    ) -> None:
        self.settings = settings
        self._run_blocking = run_blocking
        #: uv or pip, and how it is run.
        self.tool = PythonTool(settings, system=system)
        #: Held around every install, across the processes sharing this environment.
        self.install_lock = InstallLock.for_key(
            "python", sys.prefix, f"the Python environment {sys.prefix}"
        )
        self._stamp = self.install_lock.stamp()
        self._satisfied: set[frozenset[str]] = set()
        self._inflight: dict[frozenset[str], asyncio.Future[_Outcome]] = {}
        self._lock: asyncio.Lock | None = None
        self._hf_checked = False

    @property
    def installs(self) -> int:
        """Installer commands started (uv/pip runs, retries included): diagnostics and tests."""
        return self.tool.started

    # -- public --------------------------------------------------------------------------------

    async def ensure(self, reqs: Sequence[PythonRequirement], accelerate: bool = True) -> bool:
        """Make ``reqs`` importable; ``True`` when this call installed something.

        Prints one line per install to stdout (the request's captured output).
        """
        key = frozenset(r.normalized for r in reqs)
        self._catch_up()
        if accelerate and not self._hf_checked:
            self._enable_hf_transfer()
        if key in self._satisfied:
            return False
        started = time.monotonic()
        fut = self._inflight.get(key)
        leader = fut is None
        if fut is None:
            fut = asyncio.ensure_future(self._resolve(key, tuple(reqs), accelerate))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._finished(key, f))
        outcome = await asyncio.shield(fut)
        what = ", ".join(outcome.packages)
        if outcome.elsewhere:
            print(
                f"[flashrt] {what} already installed by another process "
                f"(waited {time.monotonic() - started:.2f} s)"
            )
            return False
        if not outcome.changed:
            return False
        if leader:
            print(
                f"[flashrt] installed {what} with {outcome.tool} in {outcome.seconds:.2f} s"
                + outcome.note
            )
            return True
        waited = time.monotonic() - started
        print(
            f"[flashrt] {what} installed by a concurrent request with {outcome.tool} "
            f"in {outcome.seconds:.2f} s (waited {waited:.2f} s)"
        )
        return False

    def forget(self) -> None:
        """Drop the remembered satisfied sets (after something else changed the environment)."""
        self._satisfied.clear()

    # -- internals -----------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """After another process's install, drop what it may have made stale (one ``stat``)."""
        stamp = self.install_lock.stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        importlib.invalidate_caches()
        self._satisfied.clear()
        self._hf_checked = False

    def _finished(self, key: frozenset[str], fut: asyncio.Future[_Outcome]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved here: waiters re-raise it; none may be left to do so

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self._run_blocking is not None:
            result: T = await self._run_blocking(fn, *args)
            return result
        return await asyncio.to_thread(fn, *args)

    async def _resolve(
        self, key: frozenset[str], reqs: tuple[PythonRequirement, ...], accelerate: bool
    ) -> _Outcome:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            missing = await self._blocking(unsatisfied_python_requirements, reqs)
            if not missing:
                self._satisfied.add(key)
                return _Outcome(changed=False)
            async with self.install_lock.hold(self.settings.install_timeout_s):
                return await self._install(key, reqs, missing, accelerate)

    async def _install(
        self,
        key: frozenset[str],
        reqs: tuple[PythonRequirement, ...],
        missing: list[PythonRequirement],
        accelerate: bool,
    ) -> _Outcome:
        """Install what is still missing; runs holding the install lock."""
        self._catch_up()
        # Checked again: another process may have installed them while this one waited, and
        # then this process must see its files before the next import.
        importlib.invalidate_caches()
        still_missing = await self._blocking(unsatisfied_python_requirements, reqs)
        if not still_missing:
            self._satisfied.add(key)
            return _Outcome(
                changed=False, packages=tuple(r.normalized for r in missing), elsewhere=True
            )
        wanted = [r.normalized for r in reqs if r.applies()]
        names = [r.normalized for r in still_missing]
        command = self.tool.command(wanted, accelerate)
        start = time.monotonic()
        try:
            note = await self.tool.install(command, names)
        finally:
            # Even a failed run may have changed site-packages: here, and for the other
            # processes, which see the lock's stamp change.
            self.install_lock.bump()
            self._stamp = self.install_lock.stamp()
            importlib.invalidate_caches()
            self._satisfied.clear()
            self._hf_checked = False
        still = await self._blocking(unsatisfied_python_requirements, reqs)
        if still:
            note += "; still unmet afterwards: " + ", ".join(r.normalized for r in still)
        else:
            self._satisfied.add(key)
        return _Outcome(
            changed=True,
            tool=command.tool,
            packages=tuple(names),
            seconds=time.monotonic() - start,
            note=note,
        )

    def _enable_hf_transfer(self) -> None:
        """Turn on hf_transfer for Hugging Face downloads once it is importable."""
        self._hf_checked = True
        if importlib.util.find_spec("hf_transfer") is None:
            return
        os.environ.setdefault("HF_HUB_ENABLE_HF_TRANSFER", "1")
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and os.environ["HF_HUB_ENABLE_HF_TRANSFER"] == "1":
            setattr(constants, "HF_HUB_ENABLE_HF_TRANSFER", True)  # noqa: B010


class PythonInstallerPlugin:
    """``python-installer``: claims ``"python"``. One per plugin manager (the entry point names
    the class), owning its :class:`PythonInstaller`; ``settings`` default to the environment's.
    """

    def __init__(self, settings: InstallerSettings | None = None) -> None:
        self._settings = settings
        #: Made on the first request with Python dependencies (``None`` until then).
        self.installer: PythonInstaller | None = None

    @property
    def settings(self) -> InstallerSettings:
        if self._settings is None:
            self._settings = load_settings(InstallerSettings)
        return self._settings

    def installer_for(self, context: PluginContext) -> PythonInstaller:
        """The plugin's installer, made on first use with the context's thread pool."""
        if self.installer is None:
            from .system import SystemInstaller

            run_blocking = context.run_blocking
            self.installer = PythonInstaller(
                self.settings,
                run_blocking=run_blocking,
                system=SystemInstaller(self.settings, run_blocking=run_blocking),
            )
        return self.installer

    @hookimpl(trylast=True)
    def flashrt_resolve_deps(
        self, request: FunctionRequest, plan: DependencyPlan, context: PluginContext
    ) -> None:
        """Claim ``"python"`` unless a plugin asked earlier did; validate every string first."""
        if not plan.python or plan.is_claimed("python"):
            return
        reqs = parse_python_requirements(plan.python)
        installer = self.installer_for(context)
        accelerate = plan.accelerate_downloads

        async def run() -> bool:
            return await installer.ensure(reqs, accelerate)

        plan.claim("python", OWNER, run, packages=tuple(r.normalized for r in reqs))
