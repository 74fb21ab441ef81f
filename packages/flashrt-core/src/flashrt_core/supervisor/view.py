"""A read-only view of the supervisor's executors, for logs, diagnostics and tests.

Apart from the dispatcher because it owns no state: it reads the pool, the launcher and the
executors, so tests check what they need here instead of reaching into private attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .launcher import Launcher
    from .process import ExecutorProcess
    from .serving import Serving

__all__ = ["Description", "ExecutorView", "describe"]


@dataclass(frozen=True)
class ExecutorView:
    """One live executor as :meth:`Supervisor.describe` reports it."""

    pid: int
    #: "serving" (takes new requests), "spare", "retry" (runs one retried request alone),
    #: "starting" or "leaving".
    role: str
    load: int
    instances: int
    abandoned: int


@dataclass(frozen=True)
class Description:
    """What the supervisor runs now: for logs, diagnostics and tests."""

    executors: tuple[ExecutorView, ...]
    in_flight: int
    zygote_pid: int | None
    #: Why no executor serves now (``None`` while one does, or while starting the first).
    problem: str | None
    #: Serving executors replaced so far, by what took their place: "spare" or "start".
    replacements: dict[str, int]
    #: Seconds the next executor start waits: executors keep failing to start.
    backoff_s: float
    #: The user's top-level imports carried to each new executor.
    carried_imports: tuple[str, ...]

    def pids(self, role: str) -> list[int]:
        return [view.pid for view in self.executors if view.role == role]


def describe(
    executors: Iterable[ExecutorProcess], launcher: Launcher, serving: Serving, in_flight: int
) -> Description:
    """The executors alive, their roles and loads, and the pool's health, as of now."""

    def role(executor: ExecutorProcess) -> str:
        if executor in serving.pool:
            return "serving"
        if executor is launcher.spare:
            return "spare"
        if executor.retry_of is not None:
            return "retry"
        return "leaving" if executor.exit_reason is not None else "starting"

    views = tuple(
        ExecutorView(e.proc.pid, role(e), e.load, e.instances, e.abandoned)
        for e in sorted(executors, key=lambda e: e.started)
        if not e.dead
    )
    zygote = launcher.zygote
    return Description(
        executors=views,
        in_flight=in_flight,
        zygote_pid=zygote.proc.pid if zygote is not None and not zygote.dead else None,
        problem=serving.problem,
        replacements=dict(serving.replacements),
        backoff_s=launcher.backoff.delay(),
        carried_imports=tuple(launcher.imports),
    )
