"""flashrt-lb over real loopback HTTP, against a bare FastAPI echo route served the same way.

Both servers are separate uvicorn processes with the same settings (uvloop and httptools when
installed, no access log). The echo route returns the request body untouched: it is the floor
for what any FastAPI-on-uvicorn worker can do, so ``ratio`` = floor / value for throughput (how
many times slower than the echo; 1.0 is as fast) and value / floor for start-up time. Both
servers run side by side and are measured in alternating rounds; medians are compared.

The clients are deliberately thin (``http.client`` for the sequential run, raw asyncio streams
for the concurrent one) so the servers, not the client library, are what is measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import statistics
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

SEQUENTIAL = 1000
CONCURRENT_CLIENTS = 16
CONCURRENT_PER_CLIENT = 100
#: Alternating rounds per server; the medians are compared.
ROUNDS = 5
SPAWNS = 3

ECHO_SERVER = textwrap.dedent(
    """
    import sys

    import uvicorn
    from fastapi import FastAPI, Request, Response

    app = FastAPI()


    @app.get("/ping")
    async def ping() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")


    @app.post("/execute")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")


    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False,
        server_header=False,
    )
    """
)


def _body() -> bytes:
    import cloudpickle

    def enc(value: Any) -> str:
        return base64.b64encode(cloudpickle.dumps(value)).decode()

    return json.dumps(
        {
            "function_name": "add",
            "function_code": "def add(a, b):\n    return a + b\n",
            "args": [enc(2), enc(3)],
            "kwargs": {},
            "dependencies": [],
            "system_dependencies": [],
        }
    ).encode()


def _worker(kind: str) -> Any:
    """A not yet started ``flashrt`` worker or bare ``echo`` server on a free loopback port."""
    from flashrt_lb.testing import WorkerProcess, free_port

    if kind == "flashrt":
        return WorkerProcess(
            {
                "FLASHRT_DISABLE_VOLUME_CACHE": "1",
                "FLASHRT_LOG_LEVEL": "WARNING",
            }
        )
    port = free_port()
    worker = WorkerProcess(command=[sys.executable, "-c", ECHO_SERVER, str(port)])
    worker.port = port
    return worker


@contextlib.contextmanager
def _server(kind: str, poll_s: float = 0.02) -> Iterator[Any]:
    """A running server (``ready_after_s``: seconds from spawn to the first ``/ping`` 200)."""
    worker = _worker(kind)
    try:
        worker.start()
        status, _ = worker.wait_ready(timeout=60, poll_s=poll_s)
        if status != 200:
            raise RuntimeError(f"{kind} server not ready ({status}):\n{worker.output()}")
        yield worker
    finally:
        worker.cleanup()


def _spawn_to_ready_s(kind: str) -> float:
    """Median over a few spawns of the time from ``Popen`` to the first ``/ping`` 200."""
    samples = []
    for _ in range(SPAWNS):
        with _server(kind, poll_s=0.005) as server:
            samples.append(server.ready_after_s)
    return statistics.median(samples)


def _sequential_rps(port: int, body: bytes) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    try:
        for _ in range(200):  # warm-up: code cache, connection, thread pool
            conn.request("POST", "/execute", body, headers)
            conn.getresponse().read()
        started = time.perf_counter()
        for _ in range(SEQUENTIAL):
            conn.request("POST", "/execute", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
        return SEQUENTIAL / (time.perf_counter() - started)
    finally:
        conn.close()


async def _client(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
    finally:
        writer.close()


def _concurrent_rps(port: int, body: bytes) -> float:
    request = (
        b"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def main() -> float:
        await asyncio.gather(*(_client(port, request, 20) for _ in range(CONCURRENT_CLIENTS)))
        started = time.perf_counter()
        await asyncio.gather(
            *(_client(port, request, CONCURRENT_PER_CLIENT) for _ in range(CONCURRENT_CLIENTS))
        )
        return CONCURRENT_CLIENTS * CONCURRENT_PER_CLIENT / (time.perf_counter() - started)

    return asyncio.run(main())


def run() -> list[dict[str, Any]]:
    body = _body()
    samples: dict[str, dict[str, list[float]]] = {
        kind: {"sequential": [], "concurrent": []} for kind in ("echo", "flashrt")
    }
    with _server("echo") as echo, _server("flashrt") as flashrt:
        # Rounds alternate between the two servers (both up, the idle one asleep), and the
        # medians are compared: on a shared VM one server's run can land on a slow minute.
        for _ in range(ROUNDS):
            for kind, server in (("echo", echo), ("flashrt", flashrt)):
                samples[kind]["sequential"].append(_sequential_rps(server.port, body))
                samples[kind]["concurrent"].append(_concurrent_rps(server.port, body))
    figures = {
        kind: {mode: statistics.median(values) for mode, values in modes.items()}
        for kind, modes in samples.items()
    }
    spawn = _spawn_to_ready_s("flashrt")
    spawn_echo = _spawn_to_ready_s("echo")
    rows = []
    for mode, label in (
        ("sequential", "one keep-alive client"),
        ("concurrent", f"{CONCURRENT_CLIENTS} concurrent clients"),
    ):
        value, floor = figures["flashrt"][mode], figures["echo"][mode]
        rows.append(
            {
                "name": f"lb /execute add(2, 3), {label}",
                "value": value,
                "unit": "req/s",
                "floor": floor,
                "ratio": floor / value,
            }
        )
    rows.append(
        {
            "name": "lb spawn to /ping 200 (median of 3)",
            "value": spawn,
            "unit": "s",
            "floor": spawn_echo,
            "ratio": spawn / spawn_echo,
        }
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
