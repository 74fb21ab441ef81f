"""Installing what a deployed app imports but its image lacks, then importing it again.

``flash build`` leaves torch and its kin out of the artifact (and whatever ``--exclude`` names),
trusting the image to have them; an image that lacks one would otherwise never start the app.
When the app's import fails with :class:`ModuleNotFoundError`, the distribution providing the
module (:mod:`flashrt_core.distributions`) is installed through the installer plugins
(``flashrt_resolve_deps``, as a request's dependencies are: into the environment the app runs
in, cached on the volume like any install), and the import runs again. It is bounded: a module
is installed for at most once, at most :data:`MAX_MODULES` of them, and every install counts
within the start-up limit. A module the app ships itself, one of the standard library's, or a
submodule missing from a package that is there is not installed for: that import fails as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import time
from typing import TYPE_CHECKING, TypeVar

from .deps import DependencyPlan
from .distributions import distribution_for, module_key
from .protocol import FunctionRequest

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from .context import PluginContext
    from .startup import StartupBound

__all__ = ["MAX_MODULES", "MissingPackage", "import_installing", "install_with_plugins"]

log = logging.getLogger("flashrt.deployed")
T = TypeVar("T")

#: How many distinct missing modules one start-up installs for before it gives up.
MAX_MODULES = 5
#: The ``function_name`` of the request the installer plugins are shown for a start-up install.
STARTUP_FUNCTION = "<deployed app start-up>"


class MissingPackage(RuntimeError):
    """A module the app imports is missing and could not be installed; the message says which,
    the distribution tried and why it failed."""


async def install_with_plugins(context: PluginContext, distribution: str) -> bool:
    """Install ``distribution`` through the installer plugins; ``True`` if that changed the
    environment. Raises :class:`MissingPackage` with the installer's error."""
    plan = DependencyPlan(python=(distribution,))
    request = FunctionRequest(function_name=STARTUP_FUNCTION, dependencies=[distribution])
    try:
        context.pm.hook.flashrt_resolve_deps(request=request, plan=plan, context=context)
    except Exception as exc:
        raise MissingPackage(f"{type(exc).__name__}: {exc}") from exc
    steps = plan.steps()
    if not steps:
        raise MissingPackage(
            "no installer plugin installs Python packages (is flashrt-installers installed?)"
        )
    changed = False
    for step in steps:
        try:
            changed = await step.run() or changed
        except Exception as exc:
            raise MissingPackage(f"{step.owner}: {exc}") from exc
    return changed


def _missing_module(exc: BaseException) -> ModuleNotFoundError | None:
    """The :class:`ModuleNotFoundError` behind a failed import: ``exc`` or its direct cause."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, ModuleNotFoundError) and candidate.name:
            return candidate
    return None


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _in_app(top: str, app_dir: Path) -> bool:
    """Whether the app ships ``top`` itself (a package directory or a module file)."""
    if (app_dir / top).is_dir() or (app_dir / f"{top}.py").is_file():
        return True
    return any(path.suffix in (".so", ".pyd", ".pyc") for path in app_dir.glob(f"{top}.*"))


async def import_installing(
    load: Callable[[], Awaitable[T]],
    install: Callable[[str], Awaitable[bool]],
    *,
    app_dir: Path,
    bound: StartupBound,
    what: str,
) -> T:
    """``await load()`` (a fresh import each call), installing what it is missing in between.

    Each import and install is a step of ``bound`` (one deadline over all of them); ``what``
    names the import ("importing app.py"). An import failure that installing cannot fix is
    raised as it was; one it tried to is :class:`MissingPackage`, naming the module, the
    distribution and the installer's error.
    """
    tried: dict[str, tuple[str, bool]] = {}  # module -> (distribution, whether it installed)
    while True:
        try:
            return await bound.step(what, load())
        except Exception as exc:
            error = _missing_module(exc)
            if error is None or error.name is None:
                raise
            name = error.name
            module = module_key(name)
            if module is None:
                raise
            top = module.split(".")[0]
            if module in tried:
                distribution, changed = tried[module]
                how = (
                    f"after installing {distribution!r}"
                    if changed
                    else f"although {distribution!r} is installed"
                )
                raise MissingPackage(
                    f"{what} failed: No module named {name!r}, {how} for it"
                ) from exc
            if top in sys.stdlib_module_names or _in_app(top, app_dir):
                raise
            importlib.invalidate_caches()
            if _exists(module):
                if name != module:  # a submodule the installed package lacks
                    raise
                # Installed meanwhile (by another process): import again, once.
                tried[module] = (distribution_for(module), False)
                continue
            if len(tried) >= MAX_MODULES:
                raise MissingPackage(
                    f"{what} failed: No module named {name!r}; {MAX_MODULES} missing modules "
                    f"were installed for already ({', '.join(sorted(tried))}), none more are"
                ) from exc
            distribution = distribution_for(module)
            started = time.monotonic()
            try:
                changed = await bound.step(
                    f"installing {distribution} for the missing module {module!r}",
                    install(distribution),
                )
            except MissingPackage as failed:
                raise MissingPackage(
                    f"{what} failed: No module named {name!r}, and installing the distribution "
                    f"{distribution!r} for it failed: {failed}"
                ) from exc
            tried[module] = (distribution, changed)
            importlib.invalidate_caches()
            if changed:
                log.info(
                    "installed %s for the missing module %r in %.2f s",
                    distribution,
                    module,
                    time.monotonic() - started,
                )
            else:
                log.info(
                    "%s, for the missing module %r, was installed already (%.2f s)",
                    distribution,
                    module,
                    time.monotonic() - started,
                )
