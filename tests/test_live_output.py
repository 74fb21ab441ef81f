"""Live output (issue 11): each line user code writes reaches the worker's real stdout as written.

Through both shells (``flashrt-lb`` under real uvicorn, ``flashrt-qb`` in the runpod SDK's job loop
against the fake control plane) and ``flashrt exec``; the real runpod-flash client's log poll loop
(docs/contracts.md, "Live output") against the fake's HAPI endpoint; hostile output (lone
surrogates, a replaced, closed or missing ``sys.stdout``, bytes written to it), each followed by a
normal request whose own output comes back intact; and ``FLASHRT_ECHO=0``.

Timing checks compare timestamps taken on one machine's monotonic clock (the user code's, the
test's line readers', the fake's), never durations against constants.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from e2e_support import (
    clean_env,
    pickled_request,
    result_of,
    start_lb_shell,
    start_qb_shell,
    wait_until,
    worker_id_of,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from e2e_support import Shell, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow  # real worker subprocesses

QB_ENDPOINT = "ep-qb-live-output"
LINES = 10

#: ``ten_lines(token, n, pause)``: prints ``live {token} {i}`` n times; returns when it printed each
TEN_LINES = """\
def ten_lines(token, n, pause):
    import time
    printed = []
    for i in range(n):
        print(f"live {token} {i}", flush=True)
        printed.append(time.monotonic())
        time.sleep(pause)
    return printed
"""

WHOAMI = """\
def whoami(tag):
    print(f"whoami {tag}")
    return tag
"""

#: The hostile cases: (id, code of ``hostile()``, whether the request succeeds).
HOSTILE = [
    ("lone-surrogate", "def hostile():\n    print('\\ud800')\n    return 'done'\n", True),
    (
        "stdout-none",
        "def hostile():\n    import sys\n    sys.stdout = None\n    print('lost')\n"
        "    return 'done'\n",
        True,
    ),
    (
        "stdout-closed",
        "def hostile():\n    import sys\n    print('before close')\n    sys.stdout.close()\n"
        "    return 'done'\n",
        True,
    ),
    (
        "stdout-stringio",
        "def hostile():\n    import io, sys\n    sys.stdout = io.StringIO()\n"
        "    print('swallowed')\n    return 'done'\n",
        True,
    ),
    (
        "write-bytes",
        "def hostile():\n    import sys\n    sys.stdout.write(b'x')\n    return 'done'\n",
        False,
    ),
]


def _token() -> str:
    return uuid.uuid4().hex[:8]


def _count(lines: list[str], wanted: str) -> int:
    return sum(1 for line in lines if line == wanted)


@pytest.fixture(scope="module")
def lb(
    spawn_worker: Callable[..., WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shell]:
    worker = start_lb_shell(spawn_worker, tmp_path_factory.mktemp("live-lb"), name="lb-live")
    yield worker
    worker.process.stop()


@pytest.fixture(scope="module")
def qb(
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shell]:
    worker = start_qb_shell(
        spawn_worker, fake_runpod, QB_ENDPOINT, tmp_path_factory.mktemp("live-qb")
    )
    yield worker
    worker.process.stop()


@pytest.fixture(params=["lb", "qb"])
def shell(request: pytest.FixtureRequest) -> Shell:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def _assert_lines_arrived_live(
    shell: Shell, token: str, printed: list[float], answered: float
) -> None:
    """Each line was in the worker's output once, and before the code printed two lines later."""
    expected = [f"live {token} {i}" for i in range(LINES)]
    wait_until(
        lambda: all(shell.recorder.arrival(line) is not None for line in expected),
        30,
        "every line in the worker's output",
    )
    lines = shell.recorder.lines()
    assert [_count(lines, line) for line in expected] == [1] * LINES, [
        line for line in lines if token in line
    ]
    arrived = [t for t in map(shell.recorder.arrival, expected) if t is not None]
    assert len(arrived) == LINES and arrived == sorted(arrived)  # all there, in order
    # Live: line i reached the worker's stdout while the code was still running, before it
    # printed line i+2 (an ordering of timestamps on one clock, not a duration).
    late = [i for i in range(LINES - 2) if not arrived[i] < printed[i + 2]]
    assert late == [], (late, arrived, printed)
    # ... and so all but the last lines came before the answer did.
    assert all(t < answered for t in arrived[: LINES - 2])


def test_lb_lines_reach_the_server_stdout_while_the_request_runs(lb: Shell) -> None:
    token = _token()
    response = lb.execute(pickled_request("ten_lines", TEN_LINES, token, LINES, 0.4))
    answered = time.monotonic()
    printed = result_of(response)
    assert response["stdout"] == "".join(f"live {token} {i}\n" for i in range(LINES))
    _assert_lines_arrived_live(lb, token, printed, answered)


def test_qb_lines_reach_the_worker_log_while_the_job_runs(qb: Shell) -> None:
    token = _token()
    response = qb.execute(pickled_request("ten_lines", TEN_LINES, token, LINES, 0.4))
    answered = time.monotonic()
    printed = result_of(response)
    assert response["stdout"] == "".join(f"live {token} {i}\n" for i in range(LINES))
    _assert_lines_arrived_live(qb, token, printed, answered)
    # The fake's HAPI logs hold them once each too (what the client's log poll reads).
    assert qb.queue is not None
    fake = qb.queue.fake
    with fake.cond:
        served = [line.split(" ", 1)[1] for line in fake.logs[worker_id_of(QB_ENDPOINT)]]
    assert [_count(served, f"live {token} {i}") for i in range(LINES)] == [1] * LINES


CLIENT = (
    """\
import asyncio, json, sys
from runpod_flash import CpuLiveServerless, remote
from runpod_flash.core.resources import ResourceManager
import runpod

ep = CpuLiveServerless(name="ep-live-logs")

@remote(resource_config=ep, _internal=True)
"""
    + TEN_LINES
    + """
cfg = ten_lines.__remote_config__["resource_config"]
cfg.id = sys.argv[1]
ResourceManager()._add_resource(cfg.get_resource_key(), cfg)
runpod.api_key = "fake-client-key"
printed = asyncio.run(ten_lines(sys.argv[2], int(sys.argv[3]), 0.4))
print("RESULT " + json.dumps(printed), flush=True)
"""
)


def test_qb_the_real_client_shows_each_line_live_and_once(
    qb: Shell, fake_runpod: FakeRunPod, tmp_path: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = clean_env(
        RUNPOD_API_KEY="dummy-key",  # the client polls the logs only with a key
        RUNPOD_ENDPOINT_BASE_URL=fake_runpod.api_base,
        RUNPOD_HAPI_URL=fake_runpod.base_url,
        RUNPOD_API_BASE_URL=fake_runpod.base_url,
        RUNPOD_REST_API_URL=f"{fake_runpod.base_url}/v1",
        RUNPOD_CONSOLE_URL=fake_runpod.base_url,
        RUNPOD_URL_MIXED_OK="1",
        RUNPOD_FLASH_SILENCE_DEPRECATION="1",
        FLASH_IS_LIVE_PROVISIONING="true",
        COLUMNS="200",
        NO_COLOR="1",
    )
    token = _token()
    with fake_runpod.cond:
        before = set(fake_runpod.jobs)
    client = subprocess.Popen(
        [sys.executable, str(script), QB_ENDPOINT, token, str(LINES)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    console: list[tuple[float, str]] = []

    def read() -> None:
        assert client.stdout is not None
        for raw in client.stdout:
            console.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\r\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        client.wait(120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        reader.join(10)
    text = "\n".join(line for _, line in console)
    assert client.returncode == 0, text[-4000:]
    result = next(line for _, line in console if line.startswith("RESULT "))
    printed = json.loads(result.removeprefix("RESULT "))
    assert len(printed) == LINES

    # Each line exactly once on the user's console (streamed, then not repeated from stdout).
    shown = {
        i: [t for t, line in console if re.search(rf"(^|\s)live {token} {i}$", line)]
        for i in range(LINES)
    }
    assert [len(times) for times in shown.values()] == [1] * LINES, text[-4000:]
    # ... and in the worker's log exactly once.
    lines = qb.recorder.lines()
    assert [_count(lines, f"live {token} {i}") for i in range(LINES)] == [1] * LINES
    # Live: the first lines were on the console before the job was done on the platform.
    with fake_runpod.cond:
        (job_id,) = set(fake_runpod.jobs) - before
        done_at = fake_runpod.jobs[job_id].done_at
    assert done_at is not None
    assert shown[0][0] < done_at, (shown, done_at)


def test_flashrt_exec_echoes_live_on_stderr_and_keeps_stdout_for_the_json(
    tmp_path: Path,
) -> None:
    token = _token()
    request = tmp_path / "request.json"
    request.write_text(json.dumps(pickled_request("ten_lines", TEN_LINES, token, LINES, 0.4)))
    flashrt = Path(sys.executable).parent / "flashrt"
    proc = subprocess.Popen(
        [str(flashrt), "exec", str(request)],
        env=clean_env(
            FLASHRT_VOLUME_DIR=str(tmp_path / "no-volume"),
            FLASHRT_CACHE_DIR=str(tmp_path / "cache"),
        ),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stderr: list[tuple[float, str]] = []
    stdout: list[bytes] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            stderr.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\r\n")))

    def read_stdout() -> None:
        assert proc.stdout is not None
        stdout.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stderr, read_stdout)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for reader in readers:
            reader.join(10)
    out = b"".join(stdout).decode()
    err_lines = [line for _, line in stderr]
    assert proc.returncode == 0, (out[-2000:], err_lines[-40:])
    response = json.loads(out)  # stdout holds only the response JSON
    printed = result_of(response)
    assert response["stdout"] == "".join(f"live {token} {i}\n" for i in range(LINES))
    expected = [f"live {token} {i}" for i in range(LINES)]
    assert [_count(err_lines, line) for line in expected] == [1] * LINES, err_lines[-40:]
    arrived = [next(t for t, line in stderr if line == wanted) for wanted in expected]
    late = [i for i in range(LINES - 2) if not arrived[i] < printed[i + 2]]
    assert late == [], (late, arrived, printed)


@pytest.mark.parametrize(("case", "code", "succeeds"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_output_leaves_the_next_request_intact(
    shell: Shell, case: str, code: str, succeeds: bool
) -> None:
    response = shell.execute(pickled_request("hostile", code))
    # Whatever it wrote, the answer is valid JSON: it was parsed to get here, and re-encodes
    # as strict UTF-8.
    json.dumps(response, ensure_ascii=False).encode("utf-8")
    if succeeds:
        assert result_of(response) == "done"
    else:
        assert response["success"] is False, response
        assert "TypeError" in response["error"] and "bytes" in response["error"], response
    if case == "lone-surrogate":
        assert "replaced" in response["stdout"], response
        assert "\ud800" not in response["stdout"]
    if case == "stdout-closed":
        assert "before close" in (response.get("stdout") or "")

    assert shell.alive()
    tag = f"{case}-{_token()}"
    after = shell.execute(pickled_request("whoami", WHOAMI, tag))
    assert result_of(after) == tag
    assert after["stdout"] == f"whoami {tag}\n"
    wait_until(
        lambda: shell.recorder.arrival(f"whoami {tag}") is not None,
        30,
        "the next request's line echoed in the worker's output",
    )
    assert _count(shell.recorder.lines(), f"whoami {tag}") == 1


@pytest.mark.parametrize("kind", ["lb", "qb"])
def test_with_echo_off_the_line_is_only_in_the_response(
    kind: str,
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    if kind == "lb":
        worker = start_lb_shell(spawn_worker, tmp_path, name="lb-echo-off", FLASHRT_ECHO="0")
    else:
        worker = start_qb_shell(
            spawn_worker, fake_runpod, "ep-qb-echo-off", tmp_path, FLASHRT_ECHO="0"
        )
    try:
        tag = f"quiet-{_token()}"
        response = worker.execute(pickled_request("whoami", WHOAMI, tag))
        assert result_of(response) == tag
        assert response["stdout"] == f"whoami {tag}\n"
        # A second request; by its answer, anything the first echoed would long be in the log.
        assert result_of(worker.execute(pickled_request("whoami", WHOAMI, "second"))) == "second"
    finally:
        worker.process.stop()
    assert not any(tag in line for line in worker.recorder.lines()), worker.process.log()[-3000:]
