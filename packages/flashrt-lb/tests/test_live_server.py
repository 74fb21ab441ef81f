"""flashrt-lb in live mode: a real uvicorn subprocess on 127.0.0.1, shared by this module."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from typing import TYPE_CHECKING, Any

import cloudpickle
import httpx
import pytest
from flashrt_lb.testing import WorkerProcess

pytestmark = pytest.mark.slow  # real uvicorn subprocesses

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, worker_env: Any) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("lb-live")
    env = worker_env(tmp, FLASHRT_LB_MAX_BODY_BYTES=str(MAX_BODY), FLASHRT_HARD_TIMEOUT_GRACE_S="1")
    with WorkerProcess(env, health_port=True) as worker:
        status, _ = worker.wait_ready(timeout=60)
        assert status == 200, worker.output()
        yield worker


@pytest.fixture
def client(server: WorkerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def _request(name: str, code: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    def enc(v: Any) -> str:
        return base64.b64encode(cloudpickle.dumps(v)).decode()

    return {
        "function_name": name,
        "function_code": code,
        "args": [enc(a) for a in args],
        "kwargs": {k: enc(v) for k, v in kwargs.items()},
        "dependencies": [],
        "system_dependencies": [],
    }


def _value(payload: dict[str, Any]) -> Any:
    assert payload["success"] is True, payload
    return cloudpickle.loads(base64.b64decode(payload["result"]))


def test_ping_is_ready_on_both_ports_and_the_health_port_serves_only_ping(
    server: WorkerProcess, client: httpx.Client
) -> None:
    ping = client.get("/ping")
    assert (ping.status_code, ping.json()) == (200, {"status": "ready"})
    assert server.health_port is not None
    health = httpx.get(f"http://127.0.0.1:{server.health_port}/ping")
    assert (health.status_code, health.json()) == (200, {"status": "ready"})
    other = httpx.post(f"http://127.0.0.1:{server.health_port}/execute", json={})
    assert other.status_code == 404


def test_fixture_08_body_runs(client: httpx.Client, fixture_08: dict[str, Any]) -> None:
    response = client.post("/execute", json=fixture_08)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert _value(payload) == 18
    assert payload["stdout"] == "adding 4 + 5\n"


def test_the_input_envelope_is_accepted_too(
    client: httpx.Client, fixture_08: dict[str, Any]
) -> None:
    response = client.post("/execute", json={"input": fixture_08})
    assert _value(response.json()) == 18


def test_an_execution_error_is_a_200_with_success_false(client: httpx.Client) -> None:
    code = "def boom(x):\n    print('about to fail')\n    raise ValueError(f'bad value {x}')\n"
    response = client.post("/execute", json=_request("boom", code, 42))
    assert response.status_code == 200
    payload = response.json()
    assert payload["success"] is False
    assert "bad value 42" in payload["error"]
    assert "ValueError" in payload["error"]
    assert payload["stdout"] == "about to fail\n"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"this is not json", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b'{"execution_type": "function"}', 422, "function_name is required"),
        (b'{"function_name": "f", "args": "nope"}', 422, "'args'"),
    ],
)
def test_an_undecodable_body_gets_a_clear_json_error(
    client: httpx.Client, body: bytes, status: int, words: str
) -> None:
    response = client.post("/execute", content=body)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_a_declared_oversized_body_is_refused_with_413(client: httpx.Client) -> None:
    response = client.post("/execute", content=b"x" * (MAX_BODY + 1))
    assert response.status_code == 413
    assert str(MAX_BODY) in response.json()["error"]


def test_an_oversized_chunked_body_is_refused_while_it_still_arrives(
    server: WorkerProcess,
) -> None:
    # Chunked, no length declared, and the body never ends: only a server that counts while
    # reading can answer; one that buffers first would wait forever.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"y" * 16384
        for _ in range(MAX_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"exceeds the limit" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"exceeds the limit" in rest


def test_paths_other_than_ours_are_404_and_execute_only_takes_post(
    client: httpx.Client,
) -> None:
    assert client.get("/somewhere").status_code == 404
    assert client.get("/execute").status_code == 405


def test_ping_answers_within_100ms_while_a_sync_function_sleeps_3s(
    server: WorkerProcess,
) -> None:
    code = "def nap(s):\n    import time\n    time.sleep(s)\n    return 'rested'\n"

    async def scenario() -> tuple[Any, list[float], float, float]:
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as slow,
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as fast,
        ):
            await fast.get("/ping")  # connect before timing
            started = time.monotonic()
            task = asyncio.create_task(slow.post("/execute", json=_request("nap", code, 3)))
            await asyncio.sleep(0.5)
            latencies = []
            for _ in range(10):
                t0 = time.perf_counter()
                ping = await fast.get("/ping")
                latencies.append(time.perf_counter() - t0)
                assert ping.status_code == 200
                await asyncio.sleep(0.2)
            pinged_until = time.monotonic() - started
            response = await task
            return response.json(), latencies, pinged_until, time.monotonic() - started

    payload, latencies, pinged_until, total = asyncio.run(scenario())
    print(f"/ping latencies during the sleep (ms): {[round(x * 1000, 1) for x in latencies]}")
    assert _value(payload) == "rested"
    assert pinged_until < 3.0 <= total  # every ping happened while the function slept
    assert max(latencies) < 0.100


def test_settings_bad_value_exits_2_with_the_variable_named() -> None:
    worker = WorkerProcess({"FLASHRT_LB_MAX_BODY_BYTES": "lots"})
    worker.start()
    assert worker.proc is not None
    assert worker.proc.wait(30) == 2
    assert "FLASHRT_LB_MAX_BODY_BYTES" in worker.output()
    worker.cleanup()


def test_openapi_and_docs_are_not_served(client: httpx.Client) -> None:
    # Live workers expose only /ping and /execute; nothing describes or lists them.
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404, path
    assert json.loads(client.get("/ping").content) == {"status": "ready"}


# --- a client that disconnects ------------------------------------------------------------------

WAITS = """\
async def waits(marker):
    import asyncio
    open(marker + ".started", "w").close()
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        open(marker, "w").write("cancelled")
        raise
    return "slept"
"""

NAPS = """\
def naps(marker, seconds):
    import time
    open(marker + ".started", "w").close()
    time.sleep(seconds)
    open(marker, "w").write("finished")
    return "rested"
"""


def _wait_for(path: Path, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists() and path.read_text(), f"timed out waiting for {what}"
    return path.read_text()


def _call_then_hang_up(
    server: WorkerProcess, body: dict[str, Any], started: Path, rid: str
) -> None:
    """POST ``body`` to /execute, wait until its code ``started``, then close the connection."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s" % (rid.encode(), len(data), data)
        )
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the function never started"
            time.sleep(0.01)


def test_a_client_that_disconnects_cancels_its_async_call(
    server: WorkerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "cancelled"
    hung_up = time.monotonic()
    _call_then_hang_up(
        server, _request("waits", WAITS, str(marker)), tmp_path / "cancelled.started", "gone-1"
    )

    assert _wait_for(marker, 5, "the coroutine to see its cancellation") == "cancelled"
    assert time.monotonic() - hung_up < 5
    response = client.post("/execute", json=_request("waits", "def waits():\n    return 7\n"))
    assert _value(response.json()) == 7
    assert client.get("/ping").status_code == 200
    deadline = time.monotonic() + 5
    while "request gone-1: the client disconnected" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.02)


def test_a_client_that_disconnects_during_a_sync_call_has_its_result_dropped(
    server: WorkerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    # Sync code cannot be interrupted: it runs to its end (past the 1 s hard-timeout grace of
    # this server: its executor is not recycled for a caller that left), and nobody gets its
    # result.
    marker = tmp_path / "finished"
    _call_then_hang_up(
        server, _request("naps", NAPS, str(marker), 2.0), tmp_path / "finished.started", "gone-2"
    )

    response = client.post("/execute", json=_request("now", "def now():\n    return 'now'\n"))
    assert _value(response.json()) == "now"  # served meanwhile
    assert _wait_for(marker, 10, "the sync call to run to its end") == "finished"
    output = server.output()
    assert "request gone-2: the client disconnected" in output
    assert "result is dropped" in output
    assert "recycled" not in output
    again = client.post("/execute", json=_request("now", "def now():\n    return 1\n"))
    assert _value(again.json()) == 1
