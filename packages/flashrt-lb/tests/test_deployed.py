"""flashrt-lb in deployed mode, with real tar.gz artifacts and real uvicorn subprocesses.

The four workers of this module start together (start-up is mostly waiting on imports), then
each test reads what its worker did.

The deliberately slow start-up is the artifact unpack's own wait: the worker starts while
``FLASH_BUILD_ARTIFACT_PATH`` does not exist yet, the core's unpacker retries with back-off, and
the test writes the artifact (atomically, by rename) two seconds after the worker first
answered. That is the platform's real race (the artifact mount arriving late), not a test hook.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from flashrt_lb.testing import WorkerProcess

pytestmark = pytest.mark.slow  # real uvicorn subprocesses

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

USER_HANDLER = textwrap.dedent(
    """
    from fastapi import FastAPI, Request
    from pydantic import BaseModel

    import demo_logic

    app = FastAPI()


    class Numbers(BaseModel):
        x: int
        factor: int = 2


    @app.post("/double")
    async def double(body: Numbers) -> dict:
        return {"result": demo_logic.scale(body.x, body.factor)}


    @app.get("/where")
    async def where(request: Request) -> dict:  # the app's own routing must resolve names
        return {"double": request.url_for("double").path}


    @app.get("/ping")
    def ping() -> dict:  # the generated handlers define their own; ours must win
        return {"status": "healthy", "from": "user"}


    @app.post("/execute")
    async def execute() -> dict:  # reserved: must never be reached
        return {"from": "user"}
    """
)

LEGACY_APP = textwrap.dedent(
    """
    import contextlib
    import time

    from fastapi import FastAPI, Request

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {"greeting": "hello from the app's lifespan"}
        print("the app's lifespan shut down", flush=True)

    api = FastAPI(lifespan=lifespan)


    @api.get("/greet/{name}")
    def greet(name: str, request: Request) -> dict:
        time.sleep(0.01)  # a sync route: FastAPI runs it in its thread pool
        return {"text": f"{request.state.greeting}, {name}"}
    """
)


@dataclass
class Deployed:
    slow: WorkerProcess
    broken: WorkerProcess
    legacy: WorkerProcess
    bad_import: WorkerProcess
    #: /ping statuses seen before the slow worker's artifact existed.
    before_artifact: list[int] = field(default_factory=list)
    final: dict[str, tuple[int, bytes]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory, worker_env: Any, tar_gz: Any, manifest: Any
) -> Iterator[Deployed]:
    def env(name: str, **extra: str) -> tuple[Path, dict[str, str]]:
        tmp = tmp_path_factory.mktemp(name)
        return tmp, worker_env(tmp, **extra)

    slow_dir, slow_env = env("lb-slow", FLASH_RESOURCE_NAME="demo")
    slow_artifact = tar_gz(
        {
            "handler_demo.py": USER_HANDLER,
            "demo_logic.py": "def scale(x, factor):\n    return x * factor\n",
            "flash_manifest.json": manifest("demo", {"POST /double": "double"}, is_live=False),
        }
    )

    broken_dir, broken_env = env("lb-broken", FLASH_RESOURCE_NAME="demo")
    (broken_dir / "artifact.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a real gzip")

    legacy_dir, legacy_env = env(
        "lb-legacy",
        FLASH_IS_MOTHERSHIP="true",
        FLASH_MAIN_FILE="service.py",
        FLASH_APP_VARIABLE="api",
        FLASHRT_LB_EXECUTE="true",
    )
    (legacy_dir / "artifact.tar.gz").write_bytes(tar_gz({"service.py": LEGACY_APP}))

    bad_dir, bad_env = env("lb-bad-import", FLASH_RESOURCE_NAME="oops")
    (bad_dir / "artifact.tar.gz").write_bytes(
        tar_gz({"handler_oops.py": "import a_module_that_is_not_there\n"})
    )

    workers = Deployed(
        slow=WorkerProcess(slow_env),
        broken=WorkerProcess(broken_env),
        legacy=WorkerProcess(legacy_env),
        bad_import=WorkerProcess(bad_env),
    )
    everyone = (workers.slow, workers.broken, workers.legacy, workers.bad_import)
    try:
        for worker in everyone:
            worker.start()
        workers.slow.wait_listening(timeout=60)
        first_answer = time.monotonic()
        while time.monotonic() - first_answer < 2.0:
            workers.before_artifact.append(workers.slow.ping()[0])
            time.sleep(0.1)
        partial = slow_dir / "artifact.tar.gz.partial"
        partial.write_bytes(slow_artifact)
        os.replace(partial, slow_dir / "artifact.tar.gz")
        for name in ("slow", "broken", "legacy", "bad_import"):
            workers.final[name] = getattr(workers, name).wait_ready(timeout=90)
        yield workers
    finally:
        for worker in everyone:
            worker.cleanup()


def test_ping_is_204_while_the_artifact_is_awaited_then_200(deployed: Deployed) -> None:
    assert len(deployed.before_artifact) >= 10
    assert set(deployed.before_artifact) == {204}, deployed.slow.output()
    status, body = deployed.final["slow"]
    assert (status, body) == (200, b'{"status":"ready"}'), deployed.slow.output()


def test_the_deployed_apps_routes_answer_and_ours_are_reserved(deployed: Deployed) -> None:
    with httpx.Client(base_url=deployed.slow.base_url, timeout=30) as client:
        answer = client.post("/double", json={"x": 21})
        assert (answer.status_code, answer.json()) == (200, {"result": 42})
        assert client.post("/double", json={"x": 5, "factor": 3}).json() == {"result": 15}
        assert client.get("/where").json() == {"double": "/double"}
        # FastAPI's own validation still answers for the user's routes.
        assert client.post("/double", json={"y": 1}).status_code == 422
        # /ping is ours, not the app's.
        assert client.get("/ping").json() == {"status": "ready"}
        # /execute is ours too: the resource is not live, so it is off, and says how to turn it on.
        execute = client.post("/execute", json={"function_name": "f"})
        assert execute.status_code == 404
        assert "FLASHRT_LB_EXECUTE" in execute.json()["error"]
        assert client.get("/nowhere").status_code == 404


def test_a_broken_artifact_gives_503_with_the_reason_and_the_worker_stays_up(
    deployed: Deployed,
) -> None:
    status, body = deployed.final["broken"]
    assert status == 503, deployed.broken.output()
    payload = json.loads(body)
    assert payload["status"] == "failed"
    assert "artifact" in payload["reason"]
    assert "gzip" in payload["reason"].lower() or "corrupt" in payload["reason"].lower()
    # Still serving, still honest.
    assert deployed.broken.proc is not None and deployed.broken.proc.poll() is None
    assert deployed.broken.ping()[0] == 503
    execute = httpx.post(f"{deployed.broken.base_url}/execute", json={"function_name": "f"})
    assert execute.status_code == 503
    assert execute.json()["reason"] == payload["reason"]


def test_an_app_that_fails_to_import_gives_503_naming_the_error(deployed: Deployed) -> None:
    status, body = deployed.final["bad_import"]
    assert status == 503, deployed.bad_import.output()
    assert b"handler_oops.py" in body
    assert b"a_module_that_is_not_there" in body


def test_the_legacy_mothership_app_is_served_with_its_lifespan(
    deployed: Deployed, fixture_08: dict[str, Any]
) -> None:
    assert deployed.final["legacy"][0] == 200, deployed.legacy.output()
    with httpx.Client(base_url=deployed.legacy.base_url, timeout=30) as client:
        greet = client.get("/greet/flash")
        assert greet.json() == {"text": "hello from the app's lifespan, flash"}
        # FLASHRT_LB_EXECUTE=true turns /execute on beside the app.
        execute = client.post("/execute", json=fixture_08)
        assert execute.json()["success"] is True
        assert execute.json()["stdout"] == "adding 4 + 5\n"


def test_sigterm_stops_the_worker_cleanly_and_runs_the_apps_shutdown(deployed: Deployed) -> None:
    # Last in the module: it stops the legacy worker.
    assert deployed.legacy.stop(timeout=30) == 0, deployed.legacy.output()
    assert "the app's lifespan shut down" in deployed.legacy.output()


# --- the bound on start-up (FLASHRT_STARTUP_TIMEOUT_S) ---------------------------------------

STUCK_LIFESPAN = textwrap.dedent(
    """
    import asyncio
    import contextlib

    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app):
        print("lifespan entered", flush=True)
        try:
            await asyncio.Event().wait()  # a model load that never finishes
        finally:
            print("lifespan cancelled", flush=True)
        yield

    app = FastAPI(lifespan=lifespan)
    """
)

STUCK_IMPORT = textwrap.dedent(
    """
    import time

    print("import entered", flush=True)
    while True:  # module code that never returns; its thread cannot be stopped
        time.sleep(0.05)
    """
)

PATIENT_APP = textwrap.dedent(
    """
    import asyncio
    import contextlib

    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.sleep(1.5)
        yield {"loaded": "the model"}

    app = FastAPI(lifespan=lifespan)

    @app.get("/model")
    async def model() -> dict:
        return {"ok": True}
    """
)


@dataclass
class Bounded:
    stuck_lifespan: WorkerProcess
    stuck_import: WorkerProcess
    patient: WorkerProcess
    #: /ping of the stuck-lifespan worker once its lifespan had begun, within the limit.
    during: tuple[int, bytes] = (0, b"")
    final: dict[str, tuple[int, bytes]] = field(default_factory=dict)


def _wait_for_line(worker: WorkerProcess, line: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in worker.output():
        assert worker.proc is not None and worker.proc.poll() is None, worker.output()
        assert time.monotonic() < deadline, f"no {line!r} in:\n{worker.output()}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bounded(
    tmp_path_factory: pytest.TempPathFactory, worker_env: Any, tar_gz: Any, manifest: Any
) -> Iterator[Bounded]:
    def start(name: str, source: str, limit_s: str) -> WorkerProcess:
        tmp = tmp_path_factory.mktemp(f"lb-{name}")
        (tmp / "artifact.tar.gz").write_bytes(
            tar_gz(
                {
                    f"handler_{name}.py": source,
                    "flash_manifest.json": manifest(name, {}, is_live=False),
                }
            )
        )
        env = worker_env(
            tmp,
            FLASH_RESOURCE_NAME=name,
            FLASHRT_STARTUP_TIMEOUT_S=limit_s,
            FLASHRT_STARTUP_PROGRESS_S="0.3",
        )
        return WorkerProcess(env).start()

    workers: list[WorkerProcess] = []
    try:
        workers.append(start("stuck_lifespan", STUCK_LIFESPAN, "4"))
        workers.append(start("stuck_import", STUCK_IMPORT, "2"))
        workers.append(start("patient", PATIENT_APP, "60"))
        found = Bounded(*workers)
        _wait_for_line(found.stuck_lifespan, "lifespan entered")
        found.during = found.stuck_lifespan.ping()
        for name in ("stuck_lifespan", "stuck_import", "patient"):
            found.final[name] = getattr(found, name).wait_ready(timeout=90)
        yield found
    finally:
        for worker in workers:
            worker.cleanup()


def test_a_lifespan_that_never_finishes_gives_503_naming_it_after_the_limit(
    bounded: Bounded,
) -> None:
    worker = bounded.stuck_lifespan
    assert bounded.during == (204, b""), worker.output()
    status, body = bounded.final["stuck_lifespan"]
    assert status == 503, worker.output()
    reason = json.loads(body)["reason"]
    assert "running the lifespan start-up of handler_stuck_lifespan.py" in reason
    assert "within 4 s (FLASHRT_STARTUP_TIMEOUT_S)" in reason
    assert worker.ready_after_s is not None and worker.ready_after_s >= 4
    output = worker.output()
    # Meanwhile the log said what was still starting, and for how long.
    assert "start-up still running after" in output
    assert "running the lifespan start-up of handler_stuck_lifespan.py, for" in output
    # The app's lifespan was cancelled; the worker keeps serving, honestly.
    assert "lifespan cancelled" in output
    assert worker.ping() == (status, body)
    execute = httpx.post(f"{worker.base_url}/execute", json={"function_name": "f"})
    assert (execute.status_code, execute.json()["reason"]) == (503, reason)


def test_an_import_that_never_finishes_gives_503_and_the_worker_still_stops(
    bounded: Bounded,
) -> None:
    worker = bounded.stuck_import
    status, body = bounded.final["stuck_import"]
    assert status == 503, worker.output()
    reason = json.loads(body)["reason"]
    assert "still importing handler_stuck_import.py" in reason
    assert "within 2 s (FLASHRT_STARTUP_TIMEOUT_S)" in reason
    assert "import entered" in worker.output()
    assert "start-up still running after" in worker.output()
    assert worker.ping()[0] == 503
    # Its import thread never ends; SIGTERM still ends the process at once.
    began = time.monotonic()
    assert worker.stop(timeout=20) == 0, worker.output()
    assert time.monotonic() - began < 15


def test_a_start_up_within_the_limit_is_unaffected(bounded: Bounded) -> None:
    worker = bounded.patient
    assert bounded.final["patient"] == (200, b'{"status":"ready"}'), worker.output()
    assert "running the lifespan start-up of handler_patient.py, for" in worker.output()
    assert httpx.get(f"{worker.base_url}/model").json() == {"ok": True}
