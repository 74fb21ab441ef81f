"""A plain handler's job, from the handler call to job-done, without the SDK's per-job costs.

The SDK's ``rp_job.handle_job`` formats the whole output into two DEBUG messages whatever the log
level (a repr of a many-megabyte result, twice, per job), builds a retrying client per job, and
sets the job's ``X-Request-ID`` on the session every job shares (so concurrent jobs can post
under each other's id). Most of that work comes after the result is sent, so without it the
next job-take leaves sooner. The same contract is kept (docs/contracts.md, "The queue"):

* the job result is ``{"output": out}``; a dict output's ``error`` moves to the result (the job
  FAILS), its ``refresh_worker`` becomes ``stopPod``, and an empty dict output is left out;
* a handler exception fails the job with the SDK's JSON error (type, message, traceback, host,
  worker id, SDK version);
* an output JSON cannot encode fails the job with a message naming the problem (the SDK logs it
  and never answers, so the platform waits for its job timeout);
* a result whose job-done body would pass the platform's limit (:data:`JOB_DONE_MAX_BYTES`)
  fails the job at once, with a small body naming the size, the limit and what to do instead
  (the SDK posts it whole to be refused: its size check measures the dict, not the body);
* the result is POSTed to job-done (``isStream=false``) with the job's ``X-Request-ID``, and
  retried on a connection error or a 5xx, three attempts in all, 1 s then 2 s apart;
* "Started." and "Finished." are logged at INFO with the job id, as the SDK does.

A deployed generator streams through this path too (:mod:`flashrt_qb.job_stream`, the SDK's
stream contract). Generator handlers and ``--rp_debugger`` keep the SDK's own path
(:func:`sdk_handles`).
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

from .job_stream import JobStream, current_stream

if TYPE_CHECKING:
    from collections.abc import Callable

    from runpod.http_client import ClientSession

__all__ = [
    "JOB_DONE_MAX_BYTES",
    "finish_job",
    "job_result",
    "oversized_output_error",
    "post_result",
    "sdk_handles",
]

log = RunPodLogger()

#: Seconds before each retry of a job-done post that failed.
RETRY_WAITS_S = (1.0, 2.0)
#: The largest job-done body the platform takes: it refuses larger ones, and the job would stay
#: IN_PROGRESS until the endpoint's execution timeout. 20 MB in the runpod SDK's decimal
#: megabytes (``rp_tips.check_return_size``: over 20 * 10**6 bytes).
JOB_DONE_MAX_BYTES = 20_000_000


def oversized_output_error(size: int, what: str = "the job's result") -> str | None:
    """Why a body of ``size`` bytes cannot go to the platform (``what`` names it: a result, a
    stream item), or ``None`` when it fits."""
    if size <= JOB_DONE_MAX_BYTES:
        return None
    return (
        f"{what} is {size} bytes ({size / 1e6:.1f} MB) as JSON, over the platform's limit of "
        f"{JOB_DONE_MAX_BYTES} bytes ({JOB_DONE_MAX_BYTES / 1e6:g} MB): return a URL to the "
        "data instead (upload it to object storage), or write it to the network volume and "
        "return its path"
    )


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
    body = _body(result)
    problem = oversized_output_error(len(body))
    if problem is not None:  # the platform would refuse it: fail the job now, saying why
        log.error(f"Failed the job: {problem}", job["id"])
        refused = {key: value for key, value in result.items() if key == "stopPod"}
        refused["error"] = problem
        body = json.dumps(refused).encode()
    url = url_template.replace("$ID", job["id"]) + "&isStream=false"
    return await post_retrying(session, url, body, job["id"], waits)


async def post_retrying(
    session: ClientSession,
    url: str,
    body: bytes,
    job_id: str,
    waits: tuple[float, ...] = RETRY_WAITS_S,
    what: str = "",
) -> bool:
    """POST ``body`` for job ``job_id``, retrying a connection error or a 5xx after each of
    ``waits`` (a 4xx stays one); whether it landed. Job-done and the stream both post so."""
    import aiohttp

    headers = {
        "charset": "utf-8",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Request-ID": job_id,
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
            detail = f" ({what})" if what else ""
            log.error(f"Failed to return job results{detail}. | {problem}", job_id)
            return False
        await asyncio.sleep(wait)
    return False


async def finish_job(
    session: ClientSession,
    config: dict[str, Any],
    job: dict[str, Any],
    url_template: str,
    stream_url: str | None = None,
) -> None:
    """Run ``job`` through the config's handler and send its result (a plain handler's job).

    With ``stream_url`` the handler may stream instead (:mod:`flashrt_qb.job_stream`): its
    items go there as they come, and job-done closes the stream.
    """
    stream = None
    if stream_url is not None:
        aggregate = bool(config.get("return_aggregate_stream", False))
        stream = JobStream(session, stream_url, job, aggregate=aggregate, limit=JOB_DONE_MAX_BYTES)
    token = current_stream.set(stream)
    try:
        result = await job_result(config["handler"], job)
        if config.get("refresh_worker", False):
            log.info("refresh_worker flag set, stopping pod after job.", job["id"])
            result["stopPod"] = True
        if stream is not None and stream.ended:
            await stream.finish(url_template, stop_pod=bool(result.get("stopPod")))
        else:
            await post_result(session, url_template, job, result)
    finally:
        current_stream.reset(token)
        if stream is not None:
            stream.close()
        log.info("Finished.", job["id"])
