"""The real runpod-flash client against a real ``flashrt-qb`` worker, through a fake RunPod.

Fixtures 01-07 (``shared/fixtures``): the client sends exactly the captured request bodies and
gets back, in the caller, the values the fixtures' README lists. The worker is a subprocess
running the runpod SDK's production job loop; the client polls the fake's ``/status``.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import TYPE_CHECKING, Any

import pytest
from e2e_support import fixture_bodies

if TYPE_CHECKING:
    from types import ModuleType

    from e2e_support import FlashClient, RunningWorker

pytestmark = pytest.mark.slow


def _inputs_since(worker: RunningWorker, known: set[str]) -> list[dict[str, Any]]:
    fake = worker.fake
    with fake.cond:
        return [
            job.input
            for job_id, job in fake.jobs.items()
            if job_id not in known and job.endpoint == worker.endpoint
        ]


def _job_ids(worker: RunningWorker) -> set[str]:
    with worker.fake.cond:
        return set(worker.fake.jobs)


@pytest.mark.parametrize(
    ("fixture", "name", "args", "kwargs", "expected", "printed"),
    [
        ("01", "add", (2, 3), {"scale": 10}, 50, "adding 2 + 3"),
        ("02", "greet", ("flash",), {}, {"greeting": "hello flash"}, None),
        ("04", "uses_local_module", (7,), {}, 21, None),
    ],
)
def test_function_fixtures_return_their_values(
    qb_live_worker: RunningWorker,
    flash_client: FlashClient,
    client_functions: ModuleType,
    capsys: pytest.CaptureFixture[str],
    fixture: str,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    expected: Any,
    printed: str | None,
) -> None:
    fn = getattr(client_functions, name)
    flash_client.seed(fn, qb_live_worker.endpoint)
    before = _job_ids(qb_live_worker)

    assert asyncio.run(fn(*args, **kwargs)) == expected

    assert _inputs_since(qb_live_worker, before) == [b["input"] for b in fixture_bodies(fixture)]
    if printed:  # the worker's captured stdout, printed by the client on the user's console
        assert printed in capsys.readouterr().out


def test_fixture_03_installs_dependencies_then_runs(
    qb_live_worker: RunningWorker, flash_client: FlashClient, client_functions: ModuleType
) -> None:
    if importlib.util.find_spec("flashrt_installers.python") is None:
        pytest.skip(
            "fixture 03 needs the installer plugins (flashrt-installers) to install numpy; "
            "without them the worker answers that no installer claimed the dependency"
        )
    flash_client.seed(client_functions.np_sum, qb_live_worker.endpoint)
    before = _job_ids(qb_live_worker)

    # numpy goes into the worker's own (layered, throwaway) environment; libgl1 is checked
    # against dpkg's database and installed only when missing.
    assert asyncio.run(client_functions.np_sum([1, 2, 3.5])) == 6.5

    assert _inputs_since(qb_live_worker, before) == [b["input"] for b in fixture_bodies("03")]


def test_fixture_05_one_instance_keeps_state_over_three_calls(
    qb_live_worker: RunningWorker, flash_client: FlashClient, client_functions: ModuleType
) -> None:
    flash_client.seed(client_functions.Calculator, qb_live_worker.endpoint)
    before = _job_ids(qb_live_worker)

    async def session() -> list[Any]:
        calc = client_functions.Calculator(100, offset=1)
        return [await calc.compute(5, mult=2), await calc.compute(1), await calc.acompute(30)]

    assert asyncio.run(session()) == [{"value": 211, "calls": 1}, {"value": 102, "calls": 2}, 70]

    sent = _inputs_since(qb_live_worker, before)
    captured = [b["input"] for b in fixture_bodies("05")]
    assert len({s["instance_id"] for s in sent}) == 1  # one client object, one instance id
    for body in (*sent, *captured):
        body.pop("instance_id")
    assert sent == captured


def test_fixture_06_failure_raises_with_our_error_and_keeps_stdout(
    qb_live_worker: RunningWorker,
    flash_client: FlashClient,
    client_functions: ModuleType,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flash_client.seed(client_functions.boom, qb_live_worker.endpoint)
    before = _job_ids(qb_live_worker)

    with pytest.raises(Exception, match=r"^Remote execution failed: bad value 42") as failure:
        asyncio.run(client_functions.boom(42))

    message = str(failure.value)
    assert "ValueError" in message and 'raise ValueError(f"bad value {x}")' in message
    assert "about to fail" in capsys.readouterr().out  # the stdout survived the failure
    assert _inputs_since(qb_live_worker, before) == [b["input"] for b in fixture_bodies("06")]
    # On the platform side: FAILED, our error at the job level, the rest of the output kept.
    job = next(
        j
        for j in qb_live_worker.fake.jobs.values()
        if j.id not in before and j.endpoint == qb_live_worker.endpoint
    )
    assert job.status == "FAILED"
    assert job.error.startswith("bad value 42")
    assert job.output == {"success": False, "stdout": "about to fail\n"}


def test_fixture_07_json_serialization_comes_back_as_json_result(
    qb_live_worker: RunningWorker, flash_client: FlashClient, client_functions: ModuleType
) -> None:
    from runpod_flash.protos.remote_execution import FunctionRequest

    flash_client.seed(client_functions.add, qb_live_worker.endpoint)
    stub = flash_client.stub(client_functions.add)
    body = fixture_bodies("07")[0]["input"]
    before = _job_ids(qb_live_worker)

    async def call() -> Any:
        response = await stub.ExecuteFunction(FunctionRequest(**body))
        return stub.handle_response(response)

    assert asyncio.run(call()) == 50
    assert _inputs_since(qb_live_worker, before) == [body]
