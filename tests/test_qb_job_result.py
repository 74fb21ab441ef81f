"""A plain handler's job result, sent to the fake control plane's job-done over real HTTP.

:mod:`flashrt_qb.job_result` replaces the SDK's per-job handling for our handler; these tests
hold it to the platform's contract (what the job ends as, on the platform's side), including
the cases the SDK got wrong: an output JSON cannot encode, the request id header under
concurrency, a job-done that fails, and a result over the platform's limit.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_qb.job_result import (
    JOB_DONE_MAX_BYTES,
    finish_job,
    oversized_output_error,
    post_result,
    sdk_handles,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from fake_runpod import FakeJob, FakeRunPod

ENDPOINT = "ep-job-result"
FAST_RETRIES = (0.01, 0.02)


def _job(fake: FakeRunPod, job_input: Any = None) -> dict[str, Any]:
    job_id = fake.submit(ENDPOINT, job_input if job_input is not None else {"n": 1})
    return {"id": job_id, "input": job_input}


def _done_url(fake: FakeRunPod) -> str:
    env = fake.worker_env(ENDPOINT, "w-result")
    return env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "w-result")


def _finish(fake: FakeRunPod, handler: Callable[[dict[str, Any]], Any], **config: Any) -> FakeJob:
    from runpod.http_client import AsyncClientSession

    job = _job(fake)

    async def main() -> None:
        async with AsyncClientSession() as session:
            await finish_job(session, {"handler": handler, **config}, job, _done_url(fake))

    asyncio.run(main())
    return fake.jobs[job["id"]]


def test_an_output_is_the_jobs_result_and_carries_its_request_id(
    fake_runpod: FakeRunPod,
) -> None:
    async def handler(job: dict[str, Any]) -> Any:
        return {"success": True, "result": "ok", "echo": job["id"]}

    job = _finish(fake_runpod, handler)
    assert job.status == "COMPLETED"
    assert job.output == {"success": True, "result": "ok", "echo": job.id}
    assert job.request_id == job.id
    assert not job.stop_pod


def test_an_error_in_the_output_fails_the_job_and_keeps_the_rest(fake_runpod: FakeRunPod) -> None:
    def handler(job: dict[str, Any]) -> Any:
        return {"success": False, "error": "boom", "stdout": "printed\n", "refresh_worker": True}

    job = _finish(fake_runpod, handler)
    assert job.status == "FAILED"
    assert job.error == "boom"
    assert job.output == {"success": False, "stdout": "printed\n"}
    assert job.stop_pod  # the output's refresh_worker


def test_refresh_worker_in_the_config_stops_the_pod(fake_runpod: FakeRunPod) -> None:
    job = _finish(fake_runpod, lambda job: 7, refresh_worker=True)
    assert (job.status, job.output, job.stop_pod) == ("COMPLETED", 7, True)


def test_a_handler_exception_fails_the_job_with_its_traceback(fake_runpod: FakeRunPod) -> None:
    def handler(job: dict[str, Any]) -> Any:
        raise KeyError("missing-key")

    job = _finish(fake_runpod, handler)
    assert job.status == "FAILED"
    error = json.loads(job.error)
    assert error["error_type"] == "<class 'KeyError'>"
    assert "missing-key" in error["error_message"]
    assert "raise KeyError" in error["error_traceback"]


def test_an_output_json_cannot_encode_fails_the_job_naming_the_problem(
    fake_runpod: FakeRunPod,
) -> None:
    job = _finish(fake_runpod, lambda job: {"values": {1, 2}})
    assert job.status == "FAILED"
    assert "cannot be sent as JSON" in job.error and "set" in job.error


def test_an_empty_output_is_left_out(fake_runpod: FakeRunPod) -> None:
    job = _finish(fake_runpod, lambda job: {})
    assert (job.status, job.output) == ("COMPLETED", None)


def _post(fake: FakeRunPod, *faults: int) -> tuple[bool, FakeJob]:
    from runpod.http_client import AsyncClientSession

    job = _job(fake)
    fake.inject_done_faults(*faults)

    async def main() -> bool:
        async with AsyncClientSession() as session:
            result = {"output": "late"}
            return await post_result(session, _done_url(fake), job, result, FAST_RETRIES)

    try:
        landed = asyncio.run(main())
    finally:
        fake.done_faults.clear()
    return landed, fake.jobs[job["id"]]


def test_a_job_done_that_fails_with_5xx_is_retried_until_it_lands(
    fake_runpod: FakeRunPod,
) -> None:
    landed, job = _post(fake_runpod, 503, 502)
    assert landed
    assert (job.done_posts, job.status, job.output) == (3, "COMPLETED", "late")


def test_a_job_done_gives_up_after_three_attempts_or_at_once_on_a_4xx(
    fake_runpod: FakeRunPod,
) -> None:
    landed, job = _post(fake_runpod, 500, 500, 500)
    assert not landed
    assert (job.done_posts, job.status) == (3, "IN_QUEUE")

    landed, job = _post(fake_runpod, 404)
    assert not landed
    assert (job.done_posts, job.status) == (1, "IN_QUEUE")


def test_a_job_done_the_platform_cannot_be_reached_for_is_given_up() -> None:
    from runpod.http_client import AsyncClientSession

    async def main() -> bool:
        async with AsyncClientSession() as session:
            url = "http://127.0.0.1:9/v2/x/job-done/w/$ID?gpu=fake"  # discard: refused
            return await post_result(session, url, {"id": "j1"}, {"output": 1}, FAST_RETRIES)

    assert asyncio.run(main()) is False


@pytest.mark.parametrize(
    ("config", "sdk"),
    [
        ({"handler": lambda job: job}, False),
        ({"handler": lambda job: job, "rp_args": {"rp_debugger": True}}, True),
    ],
)
def test_only_plain_handlers_leave_the_sdks_handling(config: dict[str, Any], sdk: bool) -> None:
    assert sdk_handles(config) is sdk


def test_streaming_handlers_keep_the_sdks_handling() -> None:
    def gen(job: dict[str, Any]) -> Any:
        yield 1

    async def agen(job: dict[str, Any]) -> Any:
        yield 1

    async def plain(job: dict[str, Any]) -> Any:
        return 1

    assert sdk_handles({"handler": gen}) and sdk_handles({"handler": agen})
    assert not sdk_handles({"handler": plain})


# --- results over the platform's job-done limit ------------------------------------------------

#: A job-done body of exactly ``size`` bytes: ``{"output": "xx...x"}``.
_ENVELOPE = len(json.dumps({"output": ""}))


def _output_of_size(size: int) -> str:
    return "x" * (size - _ENVELOPE)


@pytest.mark.parametrize("size", [JOB_DONE_MAX_BYTES + 1, 25 * 1024 * 1024])
def test_a_result_over_the_limit_fails_the_job_at_once_with_a_small_body(
    fake_runpod: FakeRunPod, size: int
) -> None:
    output = _output_of_size(size)
    job = _finish(fake_runpod, lambda job: output)
    assert job.status == "FAILED"
    assert job.done_posts == 1
    assert job.done_bytes < 64 * 1024
    assert f"is {size} bytes" in job.error
    assert f"limit of {JOB_DONE_MAX_BYTES} bytes" in job.error
    assert "return a URL" in job.error and "network volume" in job.error
    assert job.output is None


def test_a_result_at_the_limit_is_sent_whole(fake_runpod: FakeRunPod) -> None:
    output = _output_of_size(JOB_DONE_MAX_BYTES)
    job = _finish(fake_runpod, lambda job: output)
    assert job.status == "COMPLETED", job.error
    assert job.done_bytes == JOB_DONE_MAX_BYTES
    assert job.output == output


def test_the_size_check_names_what_is_too_large() -> None:
    assert oversized_output_error(JOB_DONE_MAX_BYTES) is None
    problem = oversized_output_error(JOB_DONE_MAX_BYTES + 5, "a stream item")
    assert problem is not None
    assert problem.startswith(f"a stream item is {JOB_DONE_MAX_BYTES + 5} bytes")


def test_an_oversized_result_keeps_the_stop_pod_flag(fake_runpod: FakeRunPod) -> None:
    output = _output_of_size(JOB_DONE_MAX_BYTES + 1)
    job = _finish(fake_runpod, lambda job: {"big": output, "refresh_worker": True})
    assert (job.status, job.stop_pod) == ("FAILED", True)
    assert "over the platform's limit" in job.error
