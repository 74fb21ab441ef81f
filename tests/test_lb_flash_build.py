"""A real ``flash build`` LB artifact served by flashrt-lb in deployed mode.

The project is written to a temporary directory and built offline by the real runpod-flash CLI;
the worker unpacks the artifact, imports the generated ``handler_<resource>.py`` (which imports
the bundled runpod_flash and the user's module) and serves the user's routes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from flashrt_lb.testing import WorkerProcess

pytestmark = pytest.mark.slow  # real uvicorn subprocesses

if TYPE_CHECKING:
    from collections.abc import Iterator

os.environ.setdefault("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")

PROJECT = textwrap.dedent(
    """
    from runpod_flash import Endpoint

    api = Endpoint(name="lb_worker", cpu="cpu3c-1-2", workers=(1, 3))


    @api.post("/add")
    async def add(a: int, b: int, scale: int = 1) -> dict:
        return {"sum": (a + b) * scale}


    @api.post("/words")
    def words(text: str) -> dict:
        import time

        time.sleep(0.05)  # a sync user function
        return {"count": len(text.split()), "upper": text.upper()}


    @api.get("/hello")
    async def hello() -> dict:
        return {"hello": "world"}


    @api.get("/stream")
    async def stream():
        import asyncio

        from fastapi.responses import StreamingResponse

        async def chunks():
            for i in range(3):
                if i:
                    await asyncio.sleep(0.5)
                yield f"chunk {i}\\n"

        return StreamingResponse(chunks(), media_type="text/plain")


    @api.get("/events")
    def events():
        import time

        from fastapi.responses import StreamingResponse

        def sse():
            for i in range(3):
                if i:
                    time.sleep(0.5)
                yield f"event: tick\\ndata: {i}\\n\\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    """
)


def _flash() -> list[str]:
    script = Path(sys.executable).with_name("flash")
    if script.is_file():
        return [str(script)]
    found = shutil.which("flash")
    if found is None:
        pytest.fail("the runpod-flash CLI (`flash`) is not installed")
    return [found]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("lbproject")
    (project / "lb_worker.py").write_text(PROJECT)
    env = {**os.environ, "RUNPOD_FLASH_SILENCE_DEPRECATION": "1", "NO_COLOR": "1"}
    env.pop("RUNPOD_API_KEY", None)
    result = subprocess.run(
        [*_flash(), "build"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    artifact = project / ".flash" / "artifact.tar.gz"
    assert result.returncode == 0 and artifact.is_file(), result.stdout + result.stderr
    return project


@pytest.fixture(scope="module")
def worker(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("lbdeployed")
    env = {
        "FLASH_RESOURCE_NAME": "lb_worker",
        "FLASH_ENDPOINT_TYPE": "lb",
        "FLASH_BUILD_ARTIFACT_PATH": str(built / ".flash" / "artifact.tar.gz"),
        "FLASHRT_APP_DIR": str(tmp / "app"),
        "FLASHRT_VOLUME_DIR": str(tmp / "volume"),
        "FLASHRT_CACHE_DIR": str(tmp / "cache"),
        "FLASHRT_DISABLE_VOLUME_CACHE": "1",
        "RUNPOD_FLASH_SILENCE_DEPRECATION": "1",
    }
    # Started the way the HTTP images start it: the `flashrt-lb` console script.
    script = Path(sys.executable).with_name("flashrt-lb")
    with WorkerProcess(
        env, cwd=tmp, command=[str(script)] if script.is_file() else None
    ) as process:
        # The client's import is slow: pay it while the worker starts.
        import runpod_flash.stubs.load_balancer_sls  # noqa: F401

        status, _ = process.wait_ready(timeout=120)
        assert status == 200, process.output()
        yield process


def test_the_manifest_marks_an_lb_resource(built: Path) -> None:
    manifest = json.loads((built / ".flash" / "flash_manifest.json").read_text())
    resource = manifest["resources"]["lb_worker"]
    assert resource["is_load_balanced"] is True
    assert manifest["routes"]["lb_worker"]["POST /add"] == "add"


def test_the_user_routes_answer_with_the_functions_results(worker: WorkerProcess) -> None:
    with httpx.Client(base_url=worker.base_url, timeout=30) as client:
        assert client.post("/add", json={"a": 4, "b": 5, "scale": 2}).json() == {"sum": 18}
        assert client.post("/add", json={"a": 1, "b": 2}).json() == {"sum": 3}
        assert client.post("/words", json={"text": "fast and honest"}).json() == {
            "count": 3,
            "upper": "FAST AND HONEST",
        }
        assert client.get("/hello").json() == {"hello": "world"}
        # The generated handler's own /ping ({"status": "healthy"}) is shadowed by ours.
        assert client.get("/ping").json() == {"status": "ready"}
        assert client.post("/add", json={"a": "x"}).status_code == 422


def test_execute_follows_the_manifest_and_runs_the_real_client_call(
    worker: WorkerProcess, built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = json.loads((built / ".flash" / "flash_manifest.json").read_text())
    live = manifest["resources"]["lb_worker"]["is_live_resource"]
    from runpod_flash.stubs.load_balancer_sls import LoadBalancerSlsStub

    def mul(a, b):
        return a * b

    stub = LoadBalancerSlsStub(SimpleNamespace(endpoint_url=worker.base_url, name="deployed"))
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    if live:
        assert asyncio.run(stub(mul, None, None, True, 6, 7)) == 42
    else:
        with pytest.raises(RuntimeError, match="404"):
            asyncio.run(stub(mul, None, None, True, 6, 7))


def test_user_routes_run_concurrently(worker: WorkerProcess) -> None:
    async def burst() -> list[Any]:
        async with httpx.AsyncClient(base_url=worker.base_url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/add", json={"a": i, "b": i}) for i in range(50))
            )

    responses = asyncio.run(burst())
    assert [r.json()["sum"] for r in responses] == [2 * i for i in range(50)]


@pytest.mark.parametrize(
    ("path", "marks", "kind"),
    [
        ("/stream", [f"chunk {i}" for i in range(3)], "text/plain"),
        ("/events", [f"data: {i}" for i in range(3)], "text/event-stream"),
    ],
)
def test_a_streaming_response_reaches_the_client_chunk_by_chunk(
    worker: WorkerProcess, path: str, marks: list[str], kind: str
) -> None:
    """Three chunks 0.5 s apart (an async generator, and server-sent events from a sync one):
    each arrives as it is made, unbuffered."""
    import time

    arrived: dict[str, float] = {}
    text = ""
    with (
        httpx.Client(base_url=worker.base_url, timeout=30) as client,
        client.stream("GET", path) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        for piece in response.iter_text():
            text += piece
            for mark in marks:
                if mark in text and mark not in arrived:
                    arrived[mark] = time.monotonic()
    assert list(arrived) == marks, text
    assert arrived[marks[-1]] - arrived[marks[0]] > 0.7  # about 1 s: not held to the end
    assert arrived[marks[1]] - arrived[marks[0]] > 0.3
