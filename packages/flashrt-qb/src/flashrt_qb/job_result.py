"""A plain handler's job, from the handler call to job-done, without the SDK's per-job costs.

The SDK's ``rp_job.handle_job`` formats the whole output into two DEBUG messages whatever the log
level (a repr of a many-megabyte result, twice, per job), builds a retrying client per job, and
sets the job's ``X-Request-ID`` on the session every job shares (so concurrent jobs can post
under each other's id). Against the fake control plane a trivial job's handling and job-done
took 584 µs that way and 466 µs here, mostly after the result is sent: the next job-take leaves
sooner. The same contract is kept:

* the job result is ``{"output": out}``; a dict output's ``error`` moves to the result (the job
  FAILS), its ``refresh_worker`` becomes ``stopPod``, and an empty dict output is left out;
* a handler exception fails the job with the SDK's JSON error (type, message, traceback, host,
  worker id, SDK version);
* an output JSON cannot encode fails the job with a message naming the problem (the SDK logs it
  and never answers, so the platform waits for its job timeout);
* the result is POSTed to job-done (``isStream=false``) with the job's ``X-Request-ID``, and
  retried on a connection error or a 5xx, three attempts in all, 1 s then 2 s apart;
* "Started." and "Finished." are logged at INFO with the job id, as the SDK does.

Generator handlers and ``--rp_debugger`` keep the SDK's own path (:func:`sdk_handles`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import traceback
from typing import TYPE_CHECKING, Any

import msgspec
from runpod.serverless.modules.rp_logger import RunPodLogger

if TYPE_CHECKING:
    from collections.abc import Callable

    from runpod.http_client import ClientSession

__all__ = ["finish_job", "job_result", "post_result", "sdk_handles"]

log = RunPodLogger()

#: Seconds before each retry of a job-done post that failed.
RETRY_WAITS_S = (1.0, 2.0)
#: A result body over this is logged with a tip (the platform's limit on a job's output).
RESULT_LIMIT_BYTES = 20_000_000


def sdk_handles(config: dict[str, Any]) -> bool:
    """Whether a job of ``config`` goes through the SDK's ``handle_job`` (streams, debugger)."""
    handler = config["handler"]
    streams = inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler)
    return streams or bool(config.get("rp_args", {}).get("rp_debugger", False))


async def job_result(
    handler: Callable[[dict[str, Any]], Any], job: dict[str, Any]
) -> dict[str, Any]:
    """The job result for the handler's answer to ``job`` (see the module's contract)."""
    log.info("Started.", job["id"])
    try:
        answer = handler(job)
        if inspect.isawaitable(answer):
            answer = await answer
    except Exception as exc:
        return {"error": _error_json(exc, job["id"])}
    result: dict[str, Any] = {}
    if isinstance(answer, dict):
        error = answer.pop("error", None)
        if answer.pop("refresh_worker", None):
            result["stopPod"] = True
        if answer:
            result["output"] = answer
        if error:
            result["error"] = error
    else:
        result["output"] = answer
    return result


def _error_json(error: Exception, job_id: str) -> str:
    log.error("Captured Handler Exception", job_id)
    info = {
        "error_type": str(type(error)),
        "error_message": str(error),
        "error_traceback": "".join(traceback.format_exception(error)),
        "hostname": os.environ.get("RUNPOD_POD_HOSTNAME", "unknown"),
        "worker_id": os.environ.get("RUNPOD_POD_ID", "unknown"),
        "runpod_version": _sdk_version(),
    }
    log.error(json.dumps(info, indent=4))
    return json.dumps(info)


def _sdk_version() -> str:
    from runpod.version import __version__

    return str(__version__)


def _body(result: dict[str, Any]) -> bytes:
    """The JSON body; an output JSON cannot encode becomes the job's error. A raw output (a
    response's JSON as the executor made it) goes in as it is, never decoded."""
    if isinstance(result.get("output"), msgspec.Raw):
        return msgspec.json.encode(result)
    try:
        return json.dumps(result, ensure_ascii=False).encode()
    except (TypeError, ValueError) as error:
        failed = {key: value for key, value in result.items() if key not in ("output", "error")}
        failed["error"] = f"the handler's output cannot be sent as JSON: {error}"
        return json.dumps(failed, ensure_ascii=False).encode()


async def post_result(
    session: ClientSession,
    url_template: str,
    job: dict[str, Any],
    result: dict[str, Any],
    waits: tuple[float, ...] = RETRY_WAITS_S,
) -> bool:
    """POST ``result`` to job-done, retrying a connection error or a 5xx after each of
    ``waits``; whether it landed."""
    import aiohttp

    body = _body(result)
    if len(body) > RESULT_LIMIT_BYTES:
        # A warning, not the SDK's ``tip``: its logger raises on that level under
        # RUNPOD_LOG_LEVEL=INFO ("'TIP' is not in list"), and the result was then never sent.
        log.warn(
            f"The job's result is {len(body) / 1e6:.1f} MB, over the platform's 20 MB limit: "
            "return a URL to stored data instead."
        )
    url = url_template.replace("$ID", job["id"]) + "&isStream=false"
    headers = {
        "charset": "utf-8",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Request-ID": job["id"],
    }
    for wait in (*waits, None):
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status < 400:
                    return True
                problem = f"HTTP {response.status}"
                if response.status < 500:
                    wait = None  # a client error stays one
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            problem = f"{type(error).__name__}: {error}"
        if wait is None:
            log.error(f"Failed to return job results. | {problem}", job["id"])
            return False
        await asyncio.sleep(wait)
    return False


async def finish_job(
    session: ClientSession, config: dict[str, Any], job: dict[str, Any], url_template: str
) -> None:
    """Run ``job`` through the config's handler and send its result (a plain handler's job)."""
    try:
        result = await job_result(config["handler"], job)
        if config.get("refresh_worker", False):
            log.info("refresh_worker flag set, stopping pod after job.", job["id"])
            result["stopPod"] = True
        await post_result(session, url_template, job, result)
    finally:
        log.info("Finished.", job["id"])
