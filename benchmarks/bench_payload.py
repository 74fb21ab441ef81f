"""Big payloads: ``echo(blob)`` with a 1, 16 and 64 MiB argument (random bytes, cloudpickled and
base64'd as runpod-flash sends them) and a result as large, against floors in the same run.

* The queue shell's path: a job's input JSON, as the job loop keeps it, through
  ``Runtime.execute_json`` (an executor process), against decode + call + encode in this one
  process (msgspec JSON, base64, cloudpickle: the same work, no boundary).
* ``flashrt-lb`` ``POST /execute`` over loopback HTTP, against a FastAPI route on uvicorn doing
  the same decode + call + encode, served the same way.

Time: medians of alternating rounds (floor, flashrt, floor, ...), so a slow minute hits both.
Memory: the transient memory of the whole process tree during one request: the peak of the
summed RSS of the process and its descendants (sampled from ``/proc`` in a thread) minus the sum
before it. The HTTP client is a separate process tree and is not counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MiB = 1 << 20
SIZES = (1, 16, 64)
ROUNDS = 3
ECHO = "def echo(blob):\n    return blob\n"
PAGE = os.sysconf("SC_PAGE_SIZE")

ROUTE_SERVER = textwrap.dedent(
    """
    import base64, sys

    import cloudpickle, msgspec, uvicorn
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    def echo(blob):
        return blob

    @app.get("/ping")
    async def ping() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        body = msgspec.json.decode(await request.body())
        args = [cloudpickle.loads(base64.b64decode(a)) for a in body["args"]]
        result = base64.b64encode(cloudpickle.dumps(echo(*args))).decode()
        return Response(
            msgspec.json.encode({"success": True, "result": result}),
            media_type="application/json",
        )

    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False,
        server_header=False,
    )
    """
)


# --- memory of a process tree ---------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _rss(pid: int) -> int:
    total = 0
    for each in _tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{each}/statm").read_text().split()[1]) * PAGE
    return total


class PeakRSS:
    """The peak of the tree's summed RSS while the block runs, minus the sum before it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.grew = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        before = _rss(self.pid)
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.003):
                peak = max(peak, _rss(self.pid))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.grew = max(peak, _rss(self.pid)) - before


# --- the requests ---------------------------------------------------------------------------


def _request(blob: bytes) -> bytes:
    import cloudpickle

    arg = base64.b64encode(cloudpickle.dumps(blob)).decode()
    return json.dumps({"function_name": "echo", "function_code": ECHO, "args": [arg]}).encode()


def _check(answer: bytes, blob: bytes) -> None:
    import cloudpickle

    result = json.loads(answer)["result"]
    if cloudpickle.loads(base64.b64decode(result)) != blob:
        raise RuntimeError("the echo came back different")


def _floor(body: bytes) -> bytes:
    """Decode + call + encode in this process: the work without a boundary."""
    import cloudpickle
    import msgspec

    def echo(blob: Any) -> Any:
        return blob

    request = msgspec.json.decode(body)
    args = [cloudpickle.loads(base64.b64decode(a)) for a in request["args"]]
    result = base64.b64encode(cloudpickle.dumps(echo(*args))).decode()
    return msgspec.json.encode({"success": True, "result": result})


def _rounds(
    floor: Callable[[], bytes], flashrt: Callable[[], bytes], pids: tuple[int, int], blob: bytes
) -> tuple[float, float, float, float]:
    """Median seconds and median transient bytes of each, in alternating rounds."""
    times: dict[str, list[float]] = {"floor": [], "flashrt": []}
    grown: dict[str, list[float]] = {"floor": [], "flashrt": []}
    for _ in range(ROUNDS):
        for name, call, pid in (("floor", floor, pids[0]), ("flashrt", flashrt, pids[1])):
            meter = PeakRSS(pid)
            with meter.measure():
                start = time.perf_counter()
                answer = call()
                times[name].append(time.perf_counter() - start)
            grown[name].append(meter.grew)
            _check(answer, blob)
            del answer
    return (
        statistics.median(times["floor"]),
        statistics.median(times["flashrt"]),
        statistics.median(grown["floor"]),
        statistics.median(grown["flashrt"]),
    )


def _qb_rows() -> list[dict[str, Any]]:
    from flashrt_core import Runtime, Settings, load_settings

    loop = asyncio.new_event_loop()
    runtime = Runtime(load_settings(Settings, {}, disable_plugin_autoload=True, echo=False))
    loop.run_until_complete(runtime.start())
    rows = []
    try:
        for mib in SIZES:
            blob = os.urandom(mib * MiB)
            body = _request(blob)
            loop.run_until_complete(runtime.execute_json(memoryview(body)))  # warm
            me = os.getpid()
            floor_s, value_s, floor_b, value_b = _rounds(
                lambda body=body: _floor(body),
                lambda body=body: loop.run_until_complete(runtime.execute_json(memoryview(body))),
                (me, me),
                blob,
            )
            rows += [
                {
                    "name": f"qb path: job input JSON -> runtime, {mib} MiB (vs in-process)",
                    "value": value_s * 1e3,
                    "unit": "ms",
                    "floor": floor_s * 1e3,
                    "ratio": value_s / floor_s,
                    "target": "<= 1.3x at 16 and 64 MiB",
                },
                {
                    "name": f"qb path: transient memory, {mib} MiB (x payload)",
                    "value": value_b / MiB,
                    "unit": "MiB",
                    "floor": floor_b / MiB,
                    "ratio": value_b / (mib * MiB),
                    "target": "<= 4x payload at 64 MiB",
                },
            ]
    finally:
        loop.run_until_complete(runtime.shutdown())
        loop.close()
    return rows


# --- HTTP -----------------------------------------------------------------------------------


def _server(kind: str) -> Any:
    from flashrt_lb.testing import WorkerProcess, free_port

    if kind == "flashrt":
        worker = WorkerProcess(
            {
                "FLASHRT_DISABLE_VOLUME_CACHE": "1",
                "FLASHRT_LOG_LEVEL": "WARNING",
                "FLASHRT_ECHO": "0",
            }
        )
    else:
        port = free_port()
        worker = WorkerProcess(command=[sys.executable, "-c", ROUTE_SERVER, str(port)])
        worker.port = port
    worker.start()
    status, _ = worker.wait_ready(timeout=60)
    if status != 200:
        worker.cleanup()
        raise RuntimeError(f"{kind} server not ready ({status}):\n{worker.output()}")
    return worker


def _post(port: int, body: bytes) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/execute", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:500]!r}")
        return data
    finally:
        conn.close()


def _lb_rows() -> list[dict[str, Any]]:
    rows = []
    route, worker = _server("route"), _server("flashrt")
    try:
        for mib in SIZES:
            blob = os.urandom(mib * MiB)
            body = _request(blob)
            _post(route.port, body), _post(worker.port, body)  # warm
            floor_s, value_s, floor_b, value_b = _rounds(
                lambda body=body: _post(route.port, body),
                lambda body=body: _post(worker.port, body),
                (route.proc.pid, worker.proc.pid),
                blob,
            )
            rows += [
                {
                    "name": f"lb /execute, {mib} MiB (vs FastAPI route)",
                    "value": value_s * 1e3,
                    "unit": "ms",
                    "floor": floor_s * 1e3,
                    "ratio": value_s / floor_s,
                    "target": "<= 1.15x",
                },
                {
                    "name": f"lb /execute transient memory, {mib} MiB (vs the route's)",
                    "value": value_b / MiB,
                    "unit": "MiB",
                    "floor": floor_b / MiB,
                    "ratio": value_b / floor_b if floor_b > 0 else None,
                    "target": "<= 1.3x",
                },
            ]
    finally:
        worker.cleanup()
        route.cleanup()
    return rows


def run() -> list[dict[str, Any]]:
    return _qb_rows() + _lb_rows()
