"""The dependency plan that installer plugins fill and the runtime carries out."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["KIND_ORDER", "DependencyPlan", "InstallStep"]

#: Order in which claimed kinds run: system libraries first, since Python builds may need them.
KIND_ORDER = ("system", "python")


@dataclasses.dataclass(frozen=True)
class InstallStep:
    """One installer's work for one kind of dependency.

    ``run`` returns ``True`` when it changed the environment (so caches are persisted), ``False``
    when everything was already there. It runs inside the request's output capture: what it
    prints lands in the request's ``stdout``.
    """

    kind: str
    owner: str
    packages: tuple[str, ...]
    run: Callable[[], Awaitable[bool]]


class DependencyPlan:
    """What one request needs installed, and which plugin installs each kind.

    The first claim of a kind wins; the runtime runs the steps in :data:`KIND_ORDER` (other kinds
    after, in claim order) and reports kinds nobody claimed.
    """

    def __init__(
        self,
        *,
        python: tuple[str, ...] = (),
        system: tuple[str, ...] = (),
        accelerate_downloads: bool = True,
    ) -> None:
        self.requested: dict[str, tuple[str, ...]] = {"python": python, "system": system}
        self.accelerate_downloads = accelerate_downloads
        self._steps: dict[str, InstallStep] = {}

    @property
    def python(self) -> tuple[str, ...]:
        """Python requirement strings as the client sent them."""
        return self.requested["python"]

    @property
    def system(self) -> tuple[str, ...]:
        """System (Debian) package names as the client sent them."""
        return self.requested["system"]

    def is_claimed(self, kind: str) -> bool:
        """Whether some plugin already took ``kind``."""
        return kind in self._steps

    def claim(
        self,
        kind: str,
        owner: str,
        run: Callable[[], Awaitable[bool]],
        packages: tuple[str, ...] | None = None,
    ) -> bool:
        """Take ``kind`` for ``owner``; ``False`` (and nothing added) if another plugin has it."""
        if kind in self._steps:
            return False
        pkgs = self.requested.get(kind, ()) if packages is None else packages
        self._steps[kind] = InstallStep(kind=kind, owner=owner, packages=pkgs, run=run)
        return True

    def steps(self) -> list[InstallStep]:
        """Claimed steps in the order they must run."""
        ordered = [self._steps[k] for k in KIND_ORDER if k in self._steps]
        ordered += [s for k, s in self._steps.items() if k not in KIND_ORDER]
        return ordered

    def unclaimed(self) -> dict[str, tuple[str, ...]]:
        """Requested kinds with packages that no plugin claimed."""
        return {k: v for k, v in self.requested.items() if v and k not in self._steps}
