"""The production job loop: the SDK's ``JobScaler`` with our own job acquisition.

The SDK's ``get_jobs`` sleeps a whole second whenever the jobs it holds reach its concurrency,
and its ``run_jobs`` polls its local queue every 0.1 s, so at concurrency 1 a worker does one job
per second and each job waits ~50 ms in hand before it starts. :class:`SlotJobScaler` replaces
both with one loop: it asks for as many jobs as there are free slots, starts each the moment it
arrives, and when every slot is busy waits on an event that a finishing job sets. While idle,
exactly one job-take request is outstanding (the platform's long poll).

A job's ``input`` stays the JSON the platform sent (``msgspec.Raw``, a view of the response
body) when the handler asks for it (``raw_input`` in its config) and the SDK does not handle its
jobs: :func:`take_raw_jobs` is then the job-take, and the input reaches the runtime unparsed.

A plain handler's job is finished by :mod:`flashrt_qb.job_result` (the same contract, without the
SDK's per-job formatting of the whole output and its retrying client per job). Everything else
stays the SDK's: the job-take request (``get_job``: auth, batch take, ``job_in_progress``),
``handle_job`` for streaming handlers and ``--rp_debugger``, the stop channel
(``monitor_stop_signals``), the heartbeat with the job ids (``JobsProgress`` and its ping mirror),
SIGTERM/SIGINT handling and fitness checks. Local modes (``--test_input``, ``--rp_serve_api``, a
realtime port) go through ``runpod.serverless.start`` unchanged. The internals used here are pinned
in pyproject (``runpod>=1.12,<1.13``) and checked by ``test_sdk_internals_the_job_loop_relies_on``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec
from runpod.http_client import AsyncClientSession, TooManyRequests
from runpod.serverless.modules import rp_http, rp_job, rp_scale
from runpod.serverless.modules.rp_logger import RunPodLogger, _reset_batch_id, _set_batch_id

from .job_result import finish_job, sdk_handles

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import ModuleType

    from runpod.http_client import ClientSession

__all__ = ["SlotJobScaler", "is_production", "start", "take_raw_jobs"]

log = RunPodLogger()

#: Pause after a 429 from job-take, as the SDK's ``get_jobs`` does.
TOO_MANY_REQUESTS_PAUSE_S = 5.0
#: Longest the main thread waits for the job loop to drain after an unexpected exception.
DRAIN_BOUND_S = 30.0
#: Pause after a failed job-take (the SDK retries at once, which spins on a failing server).
ERROR_PAUSE_S = 1.0


class SlotJobScaler(rp_scale.JobScaler):  # type: ignore[misc]
    """Takes a job only when a slot is free and starts it at once; held ≤ concurrency."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        take_timeout_s: float | None = None,
        on_start: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        super().__init__(config)
        #: Handed :meth:`window_changed` as the loop starts, for whoever may grow the window.
        self.on_start = on_start
        if take_timeout_s is not None:
            self.jobs_fetcher_timeout = take_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        #: Jobs taken and not yet finished, at most: for tests and logs.
        self.peak_held = 0
        self.current_concurrency: int = 1
        #: A plain handler's jobs skip the SDK's ``handle_job`` (see :mod:`.job_result`).
        self._plain = not sdk_handles(config)
        if self._plain and config.get("raw_input") and "jobs_fetcher" not in config:
            self.jobs_fetcher = take_raw_jobs

    # --- the SDK's entry points -----------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.on_start is not None:
            self.on_start(self.window_changed)
        async with AsyncClientSession() as session:
            stops = asyncio.create_task(self.monitor_stop_signals(session))
            try:
                await self.take_jobs(session)
            finally:
                await self._drain()
                stops.cancel()
                await asyncio.gather(stops, return_exceptions=True)

    def start_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The SDK's ``start`` (shutdown signals, then :meth:`run` until done), on ``loop``.

        ``loop`` is one running in another thread (the worker's runtime loop, so that a job's
        handler and the runtime share a loop: no hop between threads per job); this thread,
        the main one, only waits, and its signal handlers still run while it does.
        """
        if loop is None:
            super().start()
            return
        sys.excepthook = rp_scale._handle_uncaught_exception
        signal.signal(signal.SIGTERM, self.handle_shutdown)
        signal.signal(signal.SIGINT, self.handle_shutdown)
        drained = threading.Event()

        async def serving() -> None:
            try:
                await self.run()
            finally:
                drained.set()

        done = asyncio.run_coroutine_threadsafe(serving(), loop)
        try:
            done.result()
        except BaseException:
            done.cancel()  # reaches run()'s task, which still drains the jobs it holds
            drained.wait(DRAIN_BOUND_S)
            raise

    def kill_worker(self) -> None:
        """Also wake the loop (a signal handler runs between bytecodes, not in a loop callback)."""
        super().kill_worker()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify)

    def window_changed(self) -> None:
        """Any thread: read ``concurrency_modifier`` again now, not when a job finishes (a
        deployed worker learns its window once start-up has read the manifest)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._notify)

    def current_occupancy(self) -> int:
        return len(self.jobs_tasks)

    # --- acquisition ----------------------------------------------------------------------

    async def take_jobs(self, session: ClientSession) -> None:
        """Until shutdown: fill the free slots, one job-take request at a time."""
        while self.is_alive():
            self.current_concurrency = max(
                1, int(self.concurrency_modifier(self.current_concurrency))
            )
            free = self.current_concurrency - len(self.jobs_tasks)
            if free <= 0:
                await self._sleep(None)
                continue
            try:
                jobs = await asyncio.wait_for(
                    self.jobs_fetcher(session, free), timeout=self.jobs_fetcher_timeout
                )
            except TooManyRequests:
                log.debug("job-take: 429, pausing")
                await self._sleep(TOO_MANY_REQUESTS_PAUSE_S)
                continue
            except asyncio.TimeoutError:
                log.debug("job-take timed out; asking again")
                continue
            except Exception as error:  # a failing control plane must not stop the loop
                log.error(f"Failed to get job. | {type(error).__name__}: {error}")
                await self._sleep(ERROR_PAUSE_S)
                continue
            # Taken jobs run even when shutdown began meanwhile: a taken job is never dropped.
            for job in jobs or ():
                self._begin(session, job)

    def _begin(self, session: ClientSession, job: dict[str, Any]) -> None:
        self.job_progress.add(job)
        self.jobs_tasks[job["id"]] = asyncio.create_task(self.handle_job(session, job))
        self.peak_held = max(self.peak_held, len(self.jobs_tasks))

    async def handle_job(self, session: ClientSession, job: dict[str, Any]) -> None:
        """The SDK's ``handle_job`` minus its local queue; a finished job frees its slot."""
        batch_token = _set_batch_id(job.get("batchId"))
        try:
            if self._plain:
                await finish_job(
                    session, self.config, job, rp_http.JOB_DONE_URL, rp_http.JOB_STREAM_URL
                )
            else:
                await self.jobs_handler(session, self.config, job)
            if self.config.get("refresh_worker", False):
                self.kill_worker()
        except asyncio.CancelledError:
            log.info("Job stopped.", job["id"])
        except Exception as error:
            log.error(f"Error handling job: {error}", job["id"])
        finally:
            self.job_progress.remove(job)
            self.jobs_tasks.pop(job["id"], None)
            _reset_batch_id(batch_token)
            self._notify()

    # --- waiting --------------------------------------------------------------------------

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, timeout: float | None) -> None:
        """Until a slot frees or shutdown begins (or ``timeout`` s pass)."""
        assert self._wake is not None
        self._wake.clear()
        if not self.is_alive():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _drain(self) -> None:
        while self.jobs_tasks:
            await asyncio.gather(*list(self.jobs_tasks.values()), return_exceptions=True)


_raw_job = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raw_jobs = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])


async def take_raw_jobs(session: ClientSession, num_jobs: int = 1) -> list[dict[str, Any]] | None:
    """The SDK's ``get_job`` (the same URL, statuses and checks), but each job's ``input`` is
    kept as the raw JSON the platform sent: parsed once, where the request runs."""
    async with session.get(rp_job._job_get_url(num_jobs)) as response:
        if response.status in (204, 400):  # no job; 400 is expected with FlashBoot
            return None
        if response.status == 429:
            raise TooManyRequests(
                response.request_info,
                response.history,
                status=response.status,
                message=response.reason,
            )
        response.raise_for_status()
        if response.content_type != "application/json" or response.content_length == 0:
            return None
        body = await response.read()
    try:
        if body.lstrip()[:1] == b"[":
            taken = _raw_jobs.decode(body)
        else:
            job = _raw_job.decode(body)
            if "id" not in job or "input" not in job:
                raise Exception("Job has missing field(s): id or input.")
            taken = [job]
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        log.debug(f"rp_job | Failed to parse JSON response: {error}")
        return None
    return [
        {key: value if key == "input" else msgspec.json.decode(value) for key, value in job.items()}
        for job in taken
    ]


def is_production(serverless: ModuleType, argv: list[str], environ: Mapping[str, str]) -> bool:
    """Whether ``runpod.serverless.start`` would run the platform job loop (not a local mode).

    The arguments are read with the SDK's own parser (abbreviations included), leaving
    ``sys.argv`` for it to consume.
    """
    if environ.get("RUNPOD_WEBHOOK_GET_JOB") is None:
        return False
    if int(environ.get("RUNPOD_REALTIME_PORT", "0") or 0):
        return False
    args, _ = serverless.parser.parse_known_args(argv[1:])
    return not (args.test_input or args.rp_serve_api)


def start(
    serverless: ModuleType,
    config: dict[str, Any],
    *,
    take_timeout_s: float | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    on_started: Callable[[], None] | None = None,
    on_start: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """``runpod.serverless.start`` with :class:`SlotJobScaler` as the production job loop.

    With ``loop`` (running in another thread) the production job loop runs there; local modes
    run on the SDK's own loop in this thread either way. ``on_started`` is called, in this
    thread, once the SDK has forked its heartbeat process (at once in local modes, which fork
    none); ``on_start`` with :meth:`SlotJobScaler.window_changed` as the production loop starts.
    """
    if not is_production(serverless, sys.argv, os.environ):
        if on_started is not None:
            on_started()
        serverless.start(config)
        return
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules.rp_fitness import run_fitness_checks
    from runpod.serverless.modules.worker_state import JobsProgress, PingJobMirror

    print(f"--- Starting Serverless Worker |  Version {serverless.runpod_version} ---")
    signal.signal(signal.SIGINT, serverless._signal_handler)
    config["reference_counter_start"] = time.perf_counter()
    config = serverless._set_config_args(config)
    asyncio.run(run_fitness_checks())
    mirror = PingJobMirror()
    JobsProgress().set_mirror(mirror)
    sdk_worker.heartbeat.start_ping(mirror)
    if on_started is not None:
        on_started()
    SlotJobScaler(config, take_timeout_s=take_timeout_s, on_start=on_start).start_on(loop)
