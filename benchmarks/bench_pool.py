"""The executor pool (``FLASHRT_EXECUTORS``) over real loopback HTTP (``flashrt-lb``).

- CPU-bound sync code: a pure-Python function of about 50 ms, 8 keep-alive clients for
  ``FLASHRT_BENCH_POOL_S`` seconds (15 by default), with ``auto`` and with one executor. The
  floor is what the cores could give: cores / the single call's time (measured alone, on the
  same worker).
- Trivial requests, 16 clients: the pool against one executor (ratio = one / pool: at most 1.0
  means not slower).
- The mixed soak of ``bench_recovery`` with the pool: innocent failures must stay at zero.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import statistics
import threading
import time
from typing import Any

POOL_S = float(os.environ.get("FLASHRT_BENCH_POOL_S", "15"))
CLIENTS = 8
BURN = (
    "def burn(n):\n    total = 0\n    for i in range(n):\n        total += i * i % 7\n"
    "    return total\n"
)


def _body(n: int) -> bytes:
    import cloudpickle

    return json.dumps(
        {
            "function_name": "burn",
            "function_code": BURN,
            "args": [base64.b64encode(cloudpickle.dumps(n)).decode()],
            "kwargs": {},
        }
    ).encode()


def _worker(executors: str) -> Any:
    from flashrt_lb.testing import WorkerProcess

    worker = WorkerProcess(
        {
            "FLASHRT_DISABLE_VOLUME_CACHE": "1",
            "FLASHRT_LOG_LEVEL": "WARNING",
            "FLASHRT_EXECUTORS": executors,
        }
    )
    worker.start()
    status, _ = worker.wait_ready(timeout=60)
    if status != 200:
        raise RuntimeError(f"flashrt-lb not ready ({status}):\n{worker.output()}")
    time.sleep(1.0)  # the rest of the pool joins the first executor
    return worker


def _call(conn: http.client.HTTPConnection, body: bytes) -> None:
    conn.request("POST", "/execute", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    if not payload.get("success"):
        raise RuntimeError(payload.get("error"))


def _single_call_s(port: int, body: bytes) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    samples = []
    for _ in range(12):
        started = time.perf_counter()
        _call(conn, body)
        samples.append(time.perf_counter() - started)
    conn.close()
    return statistics.median(samples[2:])


def _loaded_rps(port: int, body: bytes, clients: int, seconds: float) -> float:
    until = time.monotonic() + seconds
    done = [0] * clients

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < until:
            _call(conn, body)
            done[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def _calibrate(port: int) -> int:
    """The loop count that takes about 50 ms in one call here."""
    n = 200_000
    single = _single_call_s(port, _body(n))
    return max(10_000, int(n * 0.05 / single))


def run() -> list[dict[str, Any]]:
    from bench_lb import _body as trivial_body
    from bench_lb import _concurrent_rps
    from bench_recovery import soak_rows
    from flashrt_core.settings import executor_count

    cores = executor_count("auto")
    rows: list[dict[str, Any]] = []
    figures: dict[str, dict[str, float]] = {}
    n = 0
    for executors in ("1", "auto"):
        worker = _worker(executors)
        try:
            if not n:
                n = _calibrate(worker.port)
            body = _body(n)
            single = _single_call_s(worker.port, body)
            figures[executors] = {
                "single": single,
                "rps": _loaded_rps(worker.port, body, CLIENTS, POOL_S),
                "trivial": _concurrent_rps(worker.port, trivial_body()),
            }
        finally:
            worker.cleanup()
    for executors in ("auto", "1"):
        got = figures[executors]
        ideal = cores / got["single"]
        rows.append(
            {
                "name": (
                    f"lb CPU-bound {got['single'] * 1000:.0f} ms calls, {CLIENTS} clients, "
                    f"FLASHRT_EXECUTORS={executors} (floor: {cores} cores / single call)"
                ),
                "value": got["rps"],
                "unit": "req/s",
                "floor": ideal,
                "ratio": got["rps"] / ideal,
            }
        )
    rows.append(
        {
            "name": "lb trivial add(), 16 clients, pool of auto (floor: one executor)",
            "value": figures["auto"]["trivial"],
            "unit": "req/s",
            "floor": figures["1"]["trivial"],
            "ratio": figures["1"]["trivial"] / figures["auto"]["trivial"],
        }
    )
    rows += soak_rows("lb mixed load with the pool (auto)", FLASHRT_EXECUTORS="auto")
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
