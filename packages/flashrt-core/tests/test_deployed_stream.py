"""A deployed handler that yields: ``Runtime.run_deployed_job`` hands each item over as it comes.

The same API in an executor process and in-process: each item's JSON goes to ``on_item`` in
order and the answer is ``Streamed``; without ``on_item`` the items come back as one list. The
runpod SDK's rules for a generator hold: an exception, or an item that is a dict with an
``error``, ends the stream with that error; and ours: an item JSON cannot hold, or one over the
limit, ends it naming the problem, and a generator left unfinished is closed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import textwrap
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core.builtin.artifact_startup import ArtifactPlugin
from flashrt_core.builtin.volume_settings import VolumeSettings
from flashrt_core.settings import load_settings
from flashrt_core.stream import Streamed

if TYPE_CHECKING:
    from pathlib import Path

HANDLER = textwrap.dedent(
    """
    import asyncio


    def items(n, fail=-1, bad=-1, error_at=-1, big=-1, mark=None):
        try:
            for i in range(n):
                if i == fail:
                    raise ValueError(f"no item {i}")
                if i == bad:
                    yield {"i": {1, 2}}  # a set: JSON cannot hold it
                elif i == error_at:
                    yield {"error": "the model ran out of memory"}
                else:
                    yield "x" * 1000 if i == big else {"i": i}
        finally:
            if mark:
                with open(mark, "a") as f:
                    f.write("closed\\n")


    async def aitems(n):
        for i in range(n):
            await asyncio.sleep(0.01)
            yield {"a": i}


    def handler(job):
        args = dict(job["input"])
        kind = args.pop("kind", "sync")
        if kind == "plain":
            return {"plain": True}
        return aitems(**args) if kind == "async" else items(**args)
    """
)


_apps = itertools.count()


@pytest.fixture(params=["process", "none"])
def deployed(request: pytest.FixtureRequest, make_worker: Any, tmp_path: Path) -> Any:
    # A name of its own each time: an in-process app's module stays imported in this process.
    resource = f"stream_gen_{next(_apps)}"
    app = tmp_path / "app"
    app.mkdir()
    (app / f"handler_{resource}.py").write_text(HANDLER)

    def prepare(runtime: Any) -> None:  # what the queue shell sets before start
        runtime.deployed_handler_resource = resource

    # The app is already in place (FLASH_DISABLE_UNPACK): the artifact plugin records it.
    volume = load_settings(VolumeSettings, {}, app_dir=str(app))
    return make_worker(
        isolation=request.param,
        resource_name=resource,
        disable_unpack=True,
        blocked_plugins=("flashrt.artifact",),
        extra_plugins=(ArtifactPlugin(volume),),
        prepare=prepare,
    )


def _run(worker: Any, job_input: dict[str, Any], **kwargs: Any) -> tuple[Any, list[Any]]:
    got: list[Any] = []
    answer = worker.run(
        worker.rt.run_deployed_job(
            {"id": "j", "input": job_input}, lambda data: got.append(json.loads(data)), **kwargs
        )
    )
    return answer, got


def test_each_item_goes_to_on_item_in_order(deployed: Any) -> None:
    assert _run(deployed, {"n": 3}) == (Streamed(3), [{"i": 0}, {"i": 1}, {"i": 2}])
    assert _run(deployed, {"kind": "async", "n": 2}) == (Streamed(2), [{"a": 0}, {"a": 1}])
    assert _run(deployed, {"n": 0}) == (Streamed(0), [])


def test_without_on_item_the_items_are_the_output(deployed: Any) -> None:
    answer = deployed.run(deployed.rt.run_deployed_job({"id": "j", "input": {"n": 2}}))
    assert answer == [{"i": 0}, {"i": 1}]


def test_a_plain_output_is_unchanged(deployed: Any) -> None:
    assert _run(deployed, {"kind": "plain"}) == ({"plain": True}, [])


def test_an_exception_mid_stream_ends_it_with_the_error(deployed: Any) -> None:
    answer, got = _run(deployed, {"n": 3, "fail": 1})
    assert got == [{"i": 0}] and answer.items == 1
    assert "ValueError: no item 1" in answer.error


def test_an_item_naming_an_error_ends_the_stream_with_it(deployed: Any, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    answer, got = _run(deployed, {"n": 3, "error_at": 1, "mark": str(mark)})
    assert (answer, got) == (Streamed(1, "the model ran out of memory"), [{"i": 0}])
    assert mark.read_text() == "closed\n"  # the unfinished generator was closed


def test_an_item_json_cannot_hold_ends_the_stream_naming_it(deployed: Any) -> None:
    answer, got = _run(deployed, {"n": 3, "bad": 1})
    assert got == [{"i": 0}] and answer.items == 1
    assert "stream item 2 cannot be sent as JSON" in answer.error


def test_an_item_over_the_limit_ends_the_stream_naming_its_size(
    deployed: Any, tmp_path: Path
) -> None:
    mark = tmp_path / "mark"
    answer, got = _run(deployed, {"n": 3, "big": 1, "mark": str(mark)}, max_item_bytes=500)
    assert got == [{"i": 0}] and answer.items == 1
    assert "stream item 2 is 0.0 MB (1002 bytes)" in answer.error
    assert "limit of 0.0005 MB (500 bytes)" in answer.error
    assert mark.read_text() == "closed\n"


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_job_after_a_failed_start_up_is_answered_with_its_reason(
    make_worker: Any, tmp_path: Path, isolation: str
) -> None:
    app = tmp_path / "app"
    app.mkdir()  # no handler_<resource>.py in it: start-up cannot load one

    def prepare(runtime: Any) -> None:
        runtime.deployed_handler_resource = "missing_handler"

    volume = load_settings(VolumeSettings, {}, app_dir=str(app))
    worker = make_worker(
        isolation=isolation,
        resource_name="missing_handler",
        disable_unpack=True,
        executor_start_timeout_s=10.0,
        blocked_plugins=("flashrt.artifact",),
        extra_plugins=(ArtifactPlugin(volume),),
        prepare=prepare,
    )
    job = worker.rt.run_deployed_job({"id": "j", "input": {}})
    answer = worker.run(asyncio.wait_for(job, 30))
    assert answer["success"] is False
    assert "missing_handler" in answer["error"]
