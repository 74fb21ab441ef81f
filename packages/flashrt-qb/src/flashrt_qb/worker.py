"""The queue worker: the runpod SDK's job loop in front of one process-wide ``Runtime``.

Shape of the process:

* The ``Runtime`` lives on an event loop in a thread of its own. Its start-up (plugins, cache
  hydration, artifact unpacking) begins at once, while the main thread is still importing the
  runpod SDK, so a cold start costs the longer of the two instead of their sum; only the
  deployed handler's import (user code, which imports runpod itself) waits for the SDK's.
* Once imported, the SDK's production job loop (:mod:`flashrt_qb.job_loop`) runs on that same
  loop, the main thread only waiting for it and handling SIGTERM, so :meth:`QueueWorker.handler`
  awaits the job in place: no hop between threads per job. Nothing blocking runs on the loop
  (user code runs in the executor process, or in the runtime's threads). The SDK's local modes
  (``--test_input``, ...) run on its own loop in the main thread and hop to the runtime loop.
  When the SDK cancels a job (its stop channel), the cancellation reaches the job's request.
* Every job waits for start-up (bounded by ``FLASHRT_QB_STARTUP_TIMEOUT_S``; a job that stops
  waiting is told what is still starting); if start-up failed, every job answers with the reason.
  The deployed handler's import is itself bounded by ``FLASHRT_STARTUP_TIMEOUT_S``, where it
  runs: the executor (:func:`flashrt_core.handler_loading.load_handler_within`) or, in-process,
  here.

Concurrency: the worker runs a number of jobs at once (a semaphore on the runtime loop): the
``max_concurrency`` that ``flash build`` wrote into the manifest for a deployed worker's resource
(read once start-up has unpacked the app; until then one job), ``FLASHRT_QB_CONCURRENCY`` when it
is set (it overrides the manifest), else 1. The ready line says which, and from where. The
production job loop (:mod:`flashrt_qb.job_loop`) takes a job only when one of its slots is free
and starts it at once; ``concurrency_modifier`` tells it how many it may hold, the jobs we run
plus ``FLASHRT_QB_PREFETCH`` (default 0: a job we cannot run yet stays in the platform's queue,
where another worker can take it), and it is woken to read that again when the window grows.

Output: in live mode (and for FunctionRequests in deployed mode) the job output is the
``FunctionResponse`` as a dict without its empty fields. The SDK moves an ``error`` key from the
output to the job, marking it FAILED; runpod-flash then builds the response from the job's error
and the rest of the output (``stdout`` included) and raises ``Exception("Remote execution
failed: <error>")``. In deployed mode plain-JSON jobs get what the generated handler returns.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from flashrt_core.logs import request_id
from flashrt_core.protocol import decode_response, succeeded
from flashrt_core.readiness import Readiness, StartupFailed
from flashrt_core.settings import Settings, load_settings
from flashrt_core.stream import Streamed

from .settings import QBSettings
from .window import JobWindow

if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable, Coroutine, Mapping

    from flashrt_core.protocol import FunctionResponse
    from flashrt_core.runtime import Runtime


__all__ = ["QueueWorker", "RuntimeLoop", "response_output"]

log = logging.getLogger("flashrt.qb")
T = TypeVar("T")


class RuntimeLoop:
    """An asyncio event loop running forever in a daemon thread of its own."""

    def __init__(self, name: str = "flashrt-runtime") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait (bounded) for its thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def response_output(response: FunctionResponse) -> dict[str, Any]:
    """The job output for a response: its non-empty fields; a failure always has an error."""
    from flashrt_core.protocol import response_to_dict

    out = {k: v for k, v in response_to_dict(response).items() if v is not None}
    if not response.success and not out.get("error"):
        # An empty error would not fail the job, and the client would see an invalid response.
        out["error"] = "the request failed without an error message"
    return out


class QueueWorker:
    """One process's queue worker: the runtime thread, the SDK handler and its configuration."""

    def __init__(
        self,
        settings: Settings | None = None,
        qb: QBSettings | None = None,
        *,
        runtime: Runtime | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings or (
            runtime.settings if runtime is not None else load_settings(Settings, environ)
        )
        self.qb = qb or load_settings(QBSettings, environ)
        self.runtime = runtime
        self.loop = RuntimeLoop()
        #: Starting, ready, or failed with the reason every job then answers.
        self.readiness = Readiness(log, doing="creating the runtime (plugin discovery)")
        #: Jobs run at once, where that number came from, and the job loop's wake-up.
        self.window = JobWindow(self.qb)
        # Set while no import of the SDK is in progress. User code (the deployed handler's
        # module) imports runpod too, and two threads importing a package with import cycles
        # at once can deadlock (Python raises _DeadlockError), so that import waits for it.
        self._sdk_import_done = threading.Event()
        self._sdk_import_done.set()
        # Set while the SDK is not about to fork its heartbeat process. A child forked while
        # this process spawns one (an install at start-up) inherits the spawn's exec-status
        # pipe and keeps it open for its life: the spawn would wait for it forever.
        self._sdk_forked = threading.Event()
        self._sdk_forked.set()

    @property
    def deployed(self) -> bool:
        """Deployed mode: the code comes from a built artifact (``FLASH_RESOURCE_NAME`` set)."""
        return bool(self.settings.resource_name)

    # --- lifecycle ------------------------------------------------------------------------

    def begin(self) -> None:
        """Start the runtime thread and, on it, start-up (idempotent; returns at once)."""
        self.loop.start()
        self.loop.loop.call_soon_threadsafe(self._ensure_startup)

    def _ensure_startup(self) -> asyncio.Task[None]:
        return self.readiness.begin(self._start)

    async def _start(self) -> str:
        """The start-up steps; what the ``ready:`` line says."""
        if self.runtime is None:
            from flashrt_core.runtime import Runtime

            # Nothing else runs on this loop yet: building it here (plugin discovery imports
            # third-party modules) delays no job that could otherwise run.
            self.runtime = Runtime(self.settings)
        runtime = self.runtime
        parts = "plugins, volume cache, artifact"
        if runtime.isolated:
            parts += ", the executor process"
        if self.deployed:
            # The generated handler is loaded where user code runs: the executor by default.
            runtime.deployed_handler_resource = self.settings.resource_name
            if runtime.isolated:
                from .deployed import handler_step

                parts += f" {handler_step(self.settings.resource_name or '')}"
        self.readiness.doing(f"starting the runtime ({parts})")
        await runtime.start()
        if runtime.startup_error:
            if self.deployed:
                resource = self.settings.resource_name
                raise StartupFailed(
                    f"deployed app {resource!r} unavailable: {runtime.startup_error}"
                )
            raise StartupFailed(runtime.startup_error)
        if self.deployed and not runtime.isolated:
            await self._load_deployed(runtime)
        if self.deployed:
            await self.window.take_deployed(runtime, self.settings.resource_name or "")
        self.window.changed()  # it may have grown: the job loop reads it again
        mode = f"deployed ({self.settings.resource_name})" if self.deployed else "live"
        return (
            f"{mode} mode, {self.window.slots} job(s) at once ({self.window.source}), "
            f"{self.qb.extra} prefetched"
        )

    async def _load_deployed(self, runtime: Runtime) -> None:
        """In-process: load the generated handler now, so a broken one fails start-up."""
        from flashrt_core.deployment import DeployedAppUnavailable
        from flashrt_core.handler_loading import (
            DeployedHandlerError,
            DeployedHandlerTimeout,
            handler_step,
        )

        resource = self.settings.resource_name or ""
        if not self.settings.endpoint_id:
            log.warning(
                "FLASH_RESOURCE_NAME is set but RUNPOD_ENDPOINT_ID is not: runpod-flash decides "
                "which functions run here by the endpoint and pod ids, and without them treats "
                "the app's functions as remote ones"
            )
        try:
            # The handler imports runpod too: never alongside the main thread's import.
            self.readiness.doing("waiting for the runpod SDK's import to finish")
            await runtime.run_blocking(self._sdk_import_done.wait)
            # Its import may install what the image lacks (a subprocess): not while the SDK forks.
            self.readiness.doing("waiting for the runpod SDK to start its heartbeat process")
            await runtime.run_blocking(self._sdk_forked.wait)
            self.readiness.doing(handler_step(resource))
            await runtime.load_deployed_handler()  # bounded by the start-up limit
        except (DeployedAppUnavailable, DeployedHandlerError) as exc:
            raise StartupFailed(
                f"deployed app {resource!r} unavailable: {exc}",
                # A timeout leaves the import running in a thread of this process.
                left_running=isinstance(exc, DeployedHandlerTimeout),
            ) from None

    async def _wait_ready(self) -> str | None:
        """On the runtime loop: wait (bounded) for start-up; why it is not ready, if not."""
        self._ensure_startup()
        return await self.readiness.wait(self.qb.startup_timeout_s)

    def close(self, timeout: float = 15.0) -> None:
        """Shut the runtime down (bounded) and stop its thread."""
        if not self.loop.running:
            return
        try:
            self.loop.submit(self._shutdown()).result(timeout)
        except Exception:
            log.exception("runtime shutdown did not finish cleanly")
        self.loop.stop()

    async def _shutdown(self) -> None:
        await self.readiness.stop()
        if self.runtime is not None:
            await self.runtime.shutdown()

    # --- the SDK side ---------------------------------------------------------------------

    async def handler(self, job: dict[str, Any]) -> Any:
        """The runpod handler: the job's output, answered on the runtime loop.

        The production job loop runs on that loop, so the job is awaited in place; called from
        another loop (the SDK's local modes, tests), it hops there and back.
        """
        if asyncio.get_running_loop() is self.loop.loop:
            return await self.handle(job)
        return await asyncio.wrap_future(self.loop.submit(self.handle(job)))

    def concurrency_modifier(self, current: int) -> int:
        """The job loop's window: the jobs we run at once plus those we keep in hand."""
        del current
        return self.window.slots + self.qb.extra

    def job_loop_started(self, wake: Callable[[], None]) -> None:
        """The production job loop gives its wake-up, called when the window grows."""
        self.window.wake = wake

    def sdk_config(self) -> dict[str, Any]:
        """The ``runpod.serverless.start`` configuration."""
        return {
            "handler": self.handler,
            "raw_input": True,  # the job loop keeps each job's input as the JSON it came as
            "concurrency_modifier": self.concurrency_modifier,
            # A deployed generator's job-done carries every item (flashrt_qb.job_stream).
            "return_aggregate_stream": True,
        }

    # --- one job, on the runtime loop -----------------------------------------------------

    async def handle(self, job: Mapping[str, Any]) -> Any:
        """Answer one job (runs on the runtime loop; usable directly from tests on that loop).

        An input the job loop kept raw (``msgspec.Raw``, see :func:`.job_loop.take_raw_jobs`)
        goes to the runtime as the bytes the platform sent, and a success comes back as the
        response's raw JSON, which :mod:`.job_result` writes into job-done as it is.
        """
        job_input = job.get("input") if isinstance(job, dict) else None
        raw: memoryview | None = None
        if isinstance(job_input, msgspec.Raw):
            if not self.deployed and bytes(memoryview(job_input)[:1]) == b"{":
                raw = memoryview(job_input)
            else:  # a deployed job's plain JSON, or not an object: read it as before
                job_input = msgspec.json.decode(job_input)
                job = {**job, "input": job_input}
        if isinstance(job, dict) and job.get("id"):
            request_id.set(str(job["id"]))
        # Start-up first: it decides the window (a deployed worker's manifest) and the
        # semaphore with it.
        problem = await self._wait_ready()
        if problem is not None:
            return {"success": False, "error": problem}
        async with self.window.semaphore:
            if self.deployed:
                from .deployed import is_function_request

                if not is_function_request(job_input):
                    return await self._plain(job)
            assert self.runtime is not None
            if raw is not None:
                answer = await self.runtime.execute_json(raw)
                if succeeded(answer):
                    return msgspec.Raw(answer)
                return response_output(decode_response(answer))
            if not isinstance(job_input, dict):
                return {
                    "success": False,
                    "error": "the job's input must be a FunctionRequest object, got "
                    f"{type(job_input).__name__}",
                }
            response = await self.runtime.execute(job_input)
            return response_output(response)

    async def _plain(self, job: Mapping[str, Any]) -> Any:
        """A deployed endpoint's plain-JSON job, through the generated handler."""
        assert self.runtime is not None
        # Where user code runs (the executor by default), under the time limit.
        from .job_stream import current_stream

        stream = current_stream.get()
        if stream is None:  # a local mode: a generator's items come back as one list
            return await self.runtime.run_deployed_job(job)
        answer = await self.runtime.run_deployed_job(
            job, stream.item, max_item_bytes=stream.max_item_bytes
        )
        if isinstance(answer, Streamed):
            stream.end(answer.error)
        elif stream.count:
            # Items went out, then the job failed around its generator (its executor died,
            # its time ran out): the stream ends with that error.
            error = answer.get("error") if isinstance(answer, dict) else None
            stream.end(str(error or f"the stream ended without its end: {answer!r}"))
        else:
            return answer
        return None

    # --- the process ----------------------------------------------------------------------

    def serve(self) -> None:
        """Start up in the background, import the SDK meanwhile, then run its loop until done.

        Returns when the SDK returns (SIGTERM drained the running jobs); ``--test_input`` ends
        with the SDK's ``SystemExit``, which propagates after the runtime is shut down.
        """
        from .sdk import import_serverless, set_sdk_log_level

        self._sdk_import_done.clear()
        self._sdk_forked.clear()
        self.begin()
        try:
            serverless = import_serverless(self.qb.fast_sdk_import)
        except BaseException:
            self._sdk_forked.set()
            raise
        finally:
            self._sdk_import_done.set()
        set_sdk_log_level(self.qb.sdk_level)
        from .job_loop import start

        try:
            start(
                serverless,
                self.sdk_config(),
                take_timeout_s=self.qb.take_timeout_s,
                loop=self.loop.loop,
                on_started=self._sdk_forked.set,
                on_start=self.job_loop_started,
            )
        finally:
            self._sdk_forked.set()
            self.close()
