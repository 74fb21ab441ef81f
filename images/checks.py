"""The worker checks both ``nox -s smoke`` (a venv) and ``nox -s image`` (a container) make.

What a shell must answer is said once here; how the shell is started is the caller's business.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procs import SmokeError, collapse, ping_until_ready, request, run, tail, which

if TYPE_CHECKING:
    import subprocess

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
FIXTURES_ENV = "FLASHRT_FIXTURES_DIR"
#: The committed copies of the captured client requests, unless FLASHRT_FIXTURES_DIR says.
DEFAULT_FIXTURES = ROOT / "packages" / "flashrt-core" / "tests" / "fixtures" / "client-requests"

DEPLOYED_APP = """\
from runpod_flash import Endpoint


@Endpoint(name="sync_worker", cpu="cpu3c-1-2")
def add(a, b, scale=1):
    print(f"adding {a} + {b}")
    return (a + b) * scale
"""
#: The job the deployed app's generated handler gets, and what it must answer.
DEPLOYED_JOB = {"input": {"a": 2, "b": 3, "scale": 10}}
DEPLOYED_RESOURCE = "sync_worker"


def fixtures_dir() -> Path:
    return Path(os.environ.get(FIXTURES_ENV, DEFAULT_FIXTURES))


def fixture(prefix: str, fixtures: Path | None = None) -> dict[str, Any]:
    """The body of the first captured request in ``fixtures/<prefix>_*.json``."""
    where = fixtures or fixtures_dir()
    matches = sorted(where.glob(f"{prefix}_*.json"))
    if not matches:
        raise SmokeError(f"no fixture {prefix}_*.json in {where} (set {FIXTURES_ENV})")
    body: dict[str, Any] = json.loads(matches[0].read_text())[0]["body"]
    return body


def unpickle(encoded: str) -> Any:
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(encoded))


def sdk_job_result(output: str) -> str | None:
    """The ``Job result: {...}`` the runpod SDK logs after a local job, as a Python literal.

    The SDK logs plain ``LEVEL | message`` lines, or JSON lines once RUNPOD_ENDPOINT_ID is set.
    """
    for line in output.splitlines():
        message = line
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                message = str(json.loads(line).get("message", ""))
        _, marker, result = message.partition("Job result: ")
        if marker:
            return result.strip()
    return None


def test_input_output(output: str) -> Any:
    """The job output of a ``flashrt-qb --test_input`` run, from what it printed."""
    found = sdk_job_result(output)
    if found is None:
        raise SmokeError(f"flashrt-qb printed no job result:\n{tail(output)}")
    result: dict[str, Any] = ast.literal_eval(found)
    if "output" not in result:
        raise SmokeError(f"flashrt-qb job has no output: {result}")
    return result["output"]


def check_add_response(response: Any, *, expected: int, printed: str) -> None:
    """A FunctionResponse of the captured ``add`` requests: success, the value, its print."""
    if not (isinstance(response, dict) and response.get("success") is True):
        raise SmokeError(f"job failed: {response}")
    if response.get("json_result") is not None:
        value = response["json_result"]
    else:
        value = unpickle(response["result"])
    if value != expected or printed not in (response.get("stdout") or ""):
        raise SmokeError(f"job answered {value!r} with stdout {response.get('stdout')!r}")


def build_deployed_artifact(project: Path, home: Path, python_version: str | None = None) -> Path:
    """A real ``flash build`` of :data:`DEPLOYED_APP` in ``project``; returns the artifact."""
    project.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (project / "sync_worker.py").write_text(DEPLOYED_APP)
    flash_env = {**os.environ, "HOME": str(home), "RUNPOD_FLASH_SILENCE_DEPRECATION": "1"}
    version = ["--python-version", python_version] if python_version else []
    run([which("flash"), "build", *version], cwd=project, env=flash_env, timeout=180)
    artifact = project / ".flash" / "artifact.tar.gz"
    if not artifact.is_file():
        raise SmokeError(f"flash build made no {artifact}")
    return artifact


def check_deployed_output(output: Any, log: str) -> None:
    if output != 50:
        raise SmokeError(f"deployed job answered {output!r}, expected 50")
    if "adding 2 + 3" not in log:
        raise SmokeError("the deployed function's print did not reach the worker's output")


def check_lb(port: int, process: subprocess.Popen[bytes]) -> list[int]:
    """/ping 204 then 200 from start-up, /execute fixture 08 -> 18, /ping 200 after it.

    Returns the /ping answers seen, collapsed.
    """
    statuses = collapse(ping_until_ready(port, process))
    # Start-up runs in the background after uvicorn listens, so the first answers are 204
    # (initializing) and then 200; nothing else is allowed (docs/contracts.md, "HTTP").
    if statuses != [204, 200]:
        raise SmokeError(f"/ping answered {statuses}, expected 204 then 200")
    status, payload = request(port, "POST", "/execute", json.dumps(fixture("08")).encode())
    if status != 200:
        raise SmokeError(f"/execute answered {status}: {payload!r}")
    check_add_response(json.loads(payload), expected=18, printed="adding 4 + 5")
    status, _ = request(port, "GET", "/ping")
    if status != 200:
        raise SmokeError(f"/ping answered {status} after /execute")
    return statuses
