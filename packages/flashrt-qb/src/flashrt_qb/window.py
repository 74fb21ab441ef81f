"""The queue shell's job window: how many jobs run at once, where that number came from, and the
production job loop's wake-up when it grows.

``FLASHRT_QB_CONCURRENCY`` when set; else, for a deployed worker, the resource's
``max_concurrency`` that ``flash build`` wrote into the manifest (read once start-up has unpacked
the app); else 1. Jobs wait for start-up before they take a slot, so the semaphore is replaced
while no job holds it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from flashrt_core.runtime import Runtime

    from .settings import QBSettings

__all__ = ["JobWindow"]

log = logging.getLogger("flashrt.qb")


class JobWindow:
    """The one owner of the window: its size, its source and its semaphore."""

    def __init__(self, qb: QBSettings) -> None:
        self._explicit = qb.concurrency is not None
        self.slots = qb.slots
        #: Where :attr:`slots` came from, for the ready line.
        self.source = "FLASHRT_QB_CONCURRENCY" if self._explicit else "the default"
        self.semaphore = asyncio.Semaphore(self.slots)
        #: The production job loop's wake-up: it reads the window again.
        self.wake: Callable[[], None] | None = None

    def changed(self) -> None:
        """Tell the job loop the window may have grown."""
        if self.wake is not None:
            self.wake()

    async def take_deployed(self, runtime: Runtime, resource: str) -> None:
        """The resource's ``max_concurrency`` from the manifest, unless the setting overrides
        it. An unreadable value is named, and the window stays 1."""
        from flashrt_core.deployment import (
            MANIFEST_FILE,
            DeployedAppUnavailable,
            executor_app_dir,
            resource_max_concurrency,
        )

        app_dir = executor_app_dir(runtime.context)
        found: int | None = None
        problem: str | None = None
        try:
            if app_dir is None:
                raise DeployedAppUnavailable("the deployed app has no directory")
            found = await runtime.run_blocking(resource_max_concurrency, Path(app_dir), resource)
        except (DeployedAppUnavailable, ValueError) as exc:
            problem = str(exc)
        if self._explicit:
            if found is not None and found != self.slots:
                self.source += f", over max_concurrency={found} in {MANIFEST_FILE}"
            return
        if problem is not None:
            log.warning(
                "max_concurrency of %r not taken (%s): one job at a time", resource, problem
            )
            self.source = f"the default: {problem}"
        elif found is None:
            self.source = f"the default: resource {resource!r} sets no max_concurrency"
        else:
            self.slots = found
            self.source = f"max_concurrency of resource {resource!r} in {MANIFEST_FILE}"
            self.semaphore = asyncio.Semaphore(found)
