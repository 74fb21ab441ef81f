"""Where ready executors come from: the zygote's forks (or fresh interpreters), and the spare.

A recycle must not make the next request wait for an interpreter to start, so the launcher keeps
one **spare**: an executor that has had its ``Setup`` and said hello, idle until the serving
one goes. Every executor after the first is forked by the **zygote**
(:mod:`flashrt_core.executor.zygote`) in milliseconds, so refilling the spare, or starting the
executor of its own that a retried request runs on, costs little; without a zygote (turned off,
or not serving) a fresh interpreter is spawned instead, which is correct but slower.

The user's imports are carried over: an executor reports the top-level modules its requests
imported, and they are preloaded in the zygote (so every later fork has them) and in the spare.

Back-off is for executors that cannot start: one that dies before its hello, fails its
``Setup``, or dies while idle as the spare. A death a request causes never delays anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .. import channel as ch
from .backoff import Backoff
from .process import ExecutorProcess
from .spawning import ExecutorUnavailable, ForkedChild
from .zygote import Zygote

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..settings import Settings
    from .spawning import ExecutorSetup

__all__ = ["Launcher"]

log = logging.getLogger("flashrt.supervisor")

#: Carried-over imports are a handful of top-level names; past this many, stop adding.
_MAX_CARRIED = 256


class Launcher:
    """Makes ready executors for the supervisor, and keeps its spare."""

    def __init__(
        self,
        settings: Settings,
        setup: Callable[[], ExecutorSetup],
        watch: Callable[[ExecutorProcess], None],
    ) -> None:
        self.settings = settings
        self._setup = setup  # asked at each start: start-up may unpack the app meanwhile
        self._watch = watch
        self.loop = asyncio.get_running_loop()
        self.backoff = Backoff()
        self.zygote: Zygote | None = None
        self._zygote_task: asyncio.Task[None] | None = None
        self._zygote_starts = 0
        self._forked: dict[int, ExecutorProcess] = {}
        self.spare: ExecutorProcess | None = None
        self._spare_task: asyncio.Task[None] | None = None
        #: The user's imports, carried to each new executor (name -> origin).
        self.imports: dict[str, str] = {}
        self.closing = False
        self._loads_handler = False  # its Setup names a deployed QB handler to import

    # --- the zygote ------------------------------------------------------------------------

    @property
    def zygote_started(self) -> bool:
        return self._zygote_task is not None

    def start_zygote(self) -> None:
        """Start the zygote in the background: start-up hooks run while it imports."""
        if not self.settings.zygote or self.closing:
            return
        if self._zygote_task is None or self._zygote_task.done():
            self._zygote_task = self.loop.create_task(self._run_zygote())

    async def _run_zygote(self) -> None:
        self._zygote_starts += 1
        try:
            zygote = Zygote.spawn(self.settings, self._reaped, self._zygote_gone)
        except OSError as exc:
            log.warning("no zygote (%s): executors are spawned as fresh interpreters", exc)
            return
        try:
            await zygote.ready(self.settings.executor_start_timeout_s)
        except ExecutorUnavailable as exc:
            log.warning("%s: executors are spawned as fresh interpreters", exc)
            return
        if self.closing:
            zygote.stop()
            return
        self.zygote = zygote
        if self.imports:
            zygote.preload(self.imports)

    def _reaped(self, pid: int, returncode: int) -> None:
        executor = self._forked.pop(pid, None)
        if executor is not None and isinstance(executor.proc, ForkedChild):
            executor.proc.exited(returncode)

    def _zygote_gone(self, zygote: Zygote) -> None:
        """Its forks die with it (their parent-death signal): they are gone, and why."""
        if self.zygote is zygote:
            self.zygote = None
        forked, self._forked = self._forked, {}
        for executor in forked.values():
            executor.kill("its parent, the zygote process, ended")
            if isinstance(executor.proc, ForkedChild):
                executor.proc.exited(-9)
        if not self.closing and self._zygote_starts < 3:  # not forever: spawning still works
            self.start_zygote()

    # --- executors -------------------------------------------------------------------------

    async def launch(self) -> ExecutorProcess:
        """A fresh executor that said hello; raises :class:`ExecutorUnavailable` saying why."""
        executor = await self.make()
        await self.await_hello(executor)
        return executor

    async def make(self) -> ExecutorProcess:
        """A fresh executor, watched, not yet set up: forked by the zygote, else spawned."""
        executor = await self._make()
        self._watch(executor)
        return executor

    async def _make(self) -> ExecutorProcess:
        starting = self._zygote_task
        if starting is not None and not starting.done():  # as quick as a spawn, and then cheap
            await asyncio.wait([starting], timeout=self.settings.executor_start_timeout_s)
        zygote = self.zygote
        if zygote is not None and not zygote.dead:
            try:
                executor = await zygote.fork(self.settings.executor_start_timeout_s)
            except (ExecutorUnavailable, asyncio.TimeoutError) as exc:
                log.warning("the zygote could not fork (%s): spawning instead", exc or "timeout")
            else:
                self._forked[executor.proc.pid] = executor
                return executor
        return ExecutorProcess.spawn()

    def start_limit(self) -> float | None:
        """How long an executor may take to start (``None``: no limit). Loading a deployed QB
        handler adds the start-up limit, whose own message then comes first."""
        base = self.settings.executor_start_timeout_s
        if not self._loads_handler:
            return base
        extra = self.settings.startup_timeout_s
        return None if extra <= 0 else base + extra

    async def await_hello(self, executor: ExecutorProcess) -> None:
        """Send its ``Setup`` and wait for its hello, bounded; kill it if it cannot start."""
        # Sent now, not at spawn: the start-up hooks may have unpacked the app meanwhile.
        contents = self._setup()
        self._loads_handler = contents.deployed_handler is not None
        executor.send_setup(self.settings, contents)
        timeout = self.start_limit()
        try:
            hello = await asyncio.wait_for(asyncio.shield(executor.hello), timeout)
        except asyncio.TimeoutError:
            executor.kill("did not start in time")
            raise ExecutorUnavailable(
                f"the executor process did not start within {timeout:g} s"
            ) from None
        if hello.error:
            executor.kill("start-up failed")
            raise ExecutorUnavailable(f"the executor process could not start: {hello.error}")
        log.info("executor %d ready", hello.pid)

    def forget(self, executor: ExecutorProcess) -> None:
        self._forked.pop(executor.proc.pid, None)
        if self.spare is executor:
            self.spare = None

    # --- the spare -------------------------------------------------------------------------

    def take_spare(self) -> ExecutorProcess | None:
        """The spare, if one is ready, for the serving role; the next one starts at once."""
        spare = self.spare
        if spare is None or not spare.ready:
            return None
        self.spare = None
        self.fill_spare()
        return spare

    def fill_spare(self) -> None:
        """Make a spare in the background, unless one exists, is coming, or is turned off."""
        if not self.settings.spare or self.closing or self.spare is not None:
            return
        if self._spare_task is None or self._spare_task.done():
            self._spare_task = self.loop.create_task(self._fill())

    async def _fill(self) -> None:
        while not self.closing:
            delay = self.backoff.delay()
            if delay:
                log.warning("executors keep failing to start: next spare in %.1f s", delay)
                await asyncio.sleep(delay)
            try:
                executor = await self.launch()
            except (ExecutorUnavailable, OSError) as exc:
                if self.closing:  # killed by the shutdown while it started: nothing to say
                    return
                log.error("no spare executor: %s", exc)
                self.backoff.death()
                continue
            if self.closing:
                executor.kill("the worker is stopping")
                return
            self.spare = executor
            if self.imports:
                self._preload(executor, self.imports)
            return

    def spare_died(self) -> None:
        """The idle spare died: no request did that, so it counts toward back-off."""
        self.spare = None
        self.backoff.death()
        self.fill_spare()

    # --- carried-over imports --------------------------------------------------------------

    def imported(self, modules: Mapping[str, str]) -> None:
        """An executor's requests imported these: have the next executor import them too."""
        new = {name: origin for name, origin in modules.items() if name not in self.imports}
        room = _MAX_CARRIED - len(self.imports)
        if not new or room <= 0:
            return
        new = dict(list(new.items())[:room])
        self.imports.update(new)
        if self.zygote is not None:
            self.zygote.preload(new)
        if self.spare is not None and self.spare.ready:
            self._preload(self.spare, new)

    @staticmethod
    def _preload(executor: ExecutorProcess, modules: Mapping[str, str]) -> None:
        with contextlib.suppress(OSError):
            executor.chan.send(ch.Preload(dict(modules)))

    # --- stop ------------------------------------------------------------------------------

    def stop_tasks(self) -> None:
        """No more starts: cancel the spare's and the zygote's start-up."""
        self.closing = True
        for task in (self._spare_task, self._zygote_task):
            if task is not None:
                task.cancel()

    def stop_zygote(self) -> None:
        """Last, after the executors it forked were stopped (they die with it anyway)."""
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None
