"""The executor process: warm requests through it, crash to next answer, and the live echo.

Floors measured in the same run: plain decode + call + encode in Python, a bare socketpair
ping-pong between two processes, and printing to ``/dev/null`` in plain Python.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N = 2000
#: Rounds of the paced measure, each with its own floor.
PACED_ROUNDS = 5
LINES = 10_000
CLASS_CODE = (
    "class Adder:\n    def __init__(self):\n        self.n = 0\n"
    "    def add(self, a, b, scale=1):\n        return (a + b) * scale\n"
)
PRINTER = f"def chatter():\n    for i in range({LINES}):\n        print('progress line', i)\n"


def _best(samples: list[float]) -> float:
    return min(samples)


def _floor_us(body: dict[str, Any]) -> float:
    import cloudpickle

    def add(a: int, b: int, scale: int = 1) -> int:
        return (a + b) * scale

    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(N):
            args = [cloudpickle.loads(base64.b64decode(a)) for a in body["args"]]
            kwargs = {k: cloudpickle.loads(base64.b64decode(v)) for k, v in body["kwargs"].items()}
            base64.b64encode(cloudpickle.dumps(add(*args, **kwargs))).decode()
        samples.append((time.perf_counter() - start) / N * 1e6)
    return _best(samples)


def _recv_polling(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(64)
        except BlockingIOError:
            continue


def _pingpong_us(polling: bool = False) -> float:
    """A 64-byte round trip over a socketpair between this process and a child.

    ``polling``: both ends poll a non-blocking socket instead of sleeping in ``recv``: the floor
    a worker that never sleeps could reach.
    """
    parent, child = socket.socketpair()
    pid = os.fork()  # benchmark only: a single-threaded process, no CUDA
    if pid == 0:
        parent.close()
        child.setblocking(not polling)
        while True:
            data = _recv_polling(child) if polling else child.recv(64)
            if not data:
                os._exit(0)
            child.sendall(data)
    child.close()
    parent.setblocking(not polling)
    payload = b"x" * 64
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(N):
            parent.sendall(payload)
            if polling:
                _recv_polling(parent)
            else:
                parent.recv(64)
        samples.append((time.perf_counter() - start) / N * 1e6)
    parent.close()
    os.waitpid(pid, 0)
    return _best(samples)


def _devnull_print_ms() -> float:
    samples = []
    with open(os.devnull, "w") as sink:
        for _ in range(3):
            start = time.perf_counter()
            for i in range(LINES):
                print("progress line", i, file=sink)
            samples.append((time.perf_counter() - start) * 1e3)
    return _best(samples)


def _runtime(isolation: str, **settings: Any) -> Any:
    from flashrt_core import Runtime, Settings, load_settings

    return Runtime(
        load_settings(Settings, {}, disable_plugin_autoload=True, isolation=isolation, **settings)
    )


async def _timed(runtime: Any, request: dict[str, Any], n: int) -> float:
    for _ in range(100):
        await runtime.execute(request)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await runtime.execute(request)
        samples.append((time.perf_counter() - start) / n * 1e6)
    return _best(samples)


def _requests(body: dict[str, Any], instance_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The example's add() without its print, and the same call as a kept instance's method."""
    silent = dict(body, function_code=body["function_code"].replace("print(", "str("))
    method = {
        "execution_type": "class",
        "class_name": "Adder",
        "class_code": CLASS_CODE,
        "method_name": "add",
        "args": body["args"],
        "kwargs": body["kwargs"],
        "instance_id": instance_id,
        "create_new_instance": False,
    }
    return silent, method


def _warm_us(body: dict[str, Any], isolation: str, **settings: Any) -> tuple[float, float]:
    silent, method = _requests(body, "adder-1")

    async def main() -> tuple[float, float]:
        runtime = _runtime(isolation, **settings)  # defaults: the live echo on
        await runtime.start()
        try:
            return await _timed(runtime, silent, N), await _timed(runtime, method, N)
        finally:
            await runtime.shutdown()

    return asyncio.run(main())


def _busy(us: float) -> None:
    until = time.perf_counter() + us / 1e6
    while time.perf_counter() < until:
        pass


def _paced_us(
    body: dict[str, Any], isolation: str, **settings: Any
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Single requests, each timed alone, with ~10 µs of the caller's own work between them:
    what a caller that is not a tight loop sees. Every workspace plugin the environment has is
    loaded (the quick start's environment: the installers).

    Per round: the plain floor (measured here, the runtime idle meanwhile), then the median of
    add()'s, of the method's requests, and of add() naming dependencies already installed (the
    real client's usual request after its first call). Rounds, not one run of each: on a shared
    VM a slow minute then skews one round, not the figure.
    """
    from flashrt_core import Runtime, Settings, load_settings

    silent, method = _requests(body, "adder-paced")
    with_deps = dict(silent, dependencies=["msgspec", "cloudpickle>=2"])
    per_round = N // PACED_ROUNDS

    async def one(runtime: Any, request: dict[str, Any], n: int) -> float:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await runtime.execute(request)
            samples.append((time.perf_counter() - start) * 1e6)
            _busy(10)
        samples.sort()
        return samples[len(samples) // 2]

    async def main() -> tuple[list[float], list[float], list[float], list[float]]:
        runtime = Runtime(load_settings(Settings, {}, isolation=isolation, **settings))
        await runtime.start()
        floors: list[float] = []
        functions: list[float] = []
        methods: list[float] = []
        deps: list[float] = []
        try:
            await one(runtime, silent, 200)
            await one(runtime, method, 200)
            await one(runtime, with_deps, 200)
            for _ in range(PACED_ROUNDS):
                floors.append(_floor_us(body))
                functions.append(await one(runtime, silent, per_round))
                methods.append(await one(runtime, method, per_round))
                deps.append(await one(runtime, with_deps, per_round))
        finally:
            await runtime.shutdown()
        return floors, functions, methods, deps

    return asyncio.run(main())


def _paced_row(name: str, floors: list[float], values: list[float]) -> dict[str, Any]:
    """The rounds' median against their lowest floor: the same loop runs 4 or 7 µs depending
    on the vCPU it lands on, and the floor must not flatter the ratio."""
    value, floor = statistics.median(values), min(floors)
    return {
        "name": f"{name} (vs plain floor)",
        "value": value,
        "unit": "us",
        "floor": floor,
        "ratio": value / floor,
        "target": "<= 12x",
    }


def _crash_to_answer_s() -> float:
    die = {
        "function_name": "die",
        "function_code": "def die():\n    import os\n    os._exit(1)\n",
        "serialization_format": "json",
    }
    ok = {
        "function_name": "ok",
        "function_code": "def ok():\n    return 1\n",
        "serialization_format": "json",
    }

    async def main() -> float:
        runtime = _runtime("process", retry_on_executor_death=False)
        await runtime.start()
        samples = []
        try:
            for _ in range(5):
                await runtime.execute(die)  # answered the moment the death is seen
                start = time.perf_counter()
                response = await runtime.execute(ok)
                assert response.success, response.error
                samples.append(time.perf_counter() - start)
        finally:
            await runtime.shutdown()
        return sorted(samples)[len(samples) // 2]

    return asyncio.run(main())


def _echo_ms(isolation: str, echo: bool) -> float:
    request = {"function_name": "chatter", "function_code": PRINTER, "serialization_format": "json"}

    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below

    async def main() -> float:
        runtime = _runtime(isolation, echo=echo, max_output_bytes=64 << 20, echo_max_bytes=64 << 20)
        runtime.echo_streams = lambda _number: sink
        await runtime.start()
        samples = []
        try:
            for _ in range(3):
                start = time.perf_counter()
                response = await runtime.execute(request)
                samples.append((time.perf_counter() - start) * 1e3)
                assert response.success, response.error
        finally:
            await runtime.shutdown()
        return _best(samples)

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return asyncio.run(main())
    finally:
        sink.close()


def run() -> list[dict[str, Any]]:
    body = json.loads((ROOT / "examples" / "add.json").read_text())["input"]
    floor = _floor_us(body)
    pingpong = _pingpong_us()
    polling_pingpong = _pingpong_us(polling=True)
    fn_process, method_process = _warm_us(body, "process")
    fn_none, method_none = _warm_us(body, "none")
    paced_floors, paced_fn, paced_method, paced_deps = _paced_us(body, "process")
    none_floors, paced_fn_none, paced_method_none, paced_deps_none = _paced_us(body, "none")
    crash = _crash_to_answer_s()
    # Measured again at the end and the lower kept: on this VM the same loop runs 4 or 7 µs
    # depending on the vCPU it lands on, and the floor must not flatter the ratios.
    floor = min(floor, _floor_us(body))
    devnull = _devnull_print_ms()
    rows: list[dict[str, Any]] = [
        {
            "name": f"{where} add() naming installed dependencies, vs the same without (median)",
            "value": statistics.median(deps),
            "unit": "us",
            "floor": statistics.median(plain),
            "ratio": statistics.median(deps) / statistics.median(plain),
            "target": "<= 1.5x",
        }
        for where, deps, plain in (
            ("isolated", paced_deps, paced_fn),
            ("in-process", paced_deps_none, paced_fn_none),
        )
    ]
    rows += [
        _paced_row(
            "isolated add(), one at a time, 10 us apart, dev plugins (median)",
            paced_floors,
            paced_fn,
        ),
        _paced_row(
            "isolated method, one at a time, 10 us apart, dev plugins", paced_floors, paced_method
        ),
        _paced_row(
            "in-process add(), one at a time, 10 us apart, dev plugins", none_floors, paced_fn_none
        ),
        _paced_row(
            "in-process method, one at a time, 10 us apart, dev plugins",
            none_floors,
            paced_method_none,
        ),
    ]
    for name, value in (
        ("isolated Runtime.execute add() warm", fn_process),
        ("isolated method call on a kept instance", method_process),
        ("in-process Runtime.execute add() warm", fn_none),
        ("in-process method call on a kept instance", method_none),
    ):
        rows.append(
            {
                "name": f"{name} (vs plain floor)",
                "value": value,
                "unit": "us",
                "floor": floor,
                "ratio": value / floor,
                "target": "<= 5x",
            }
        )
    for name, value, base in (
        ("isolated add() vs socketpair ping-pong", fn_process, pingpong),
        ("isolated add() vs polling socketpair ping-pong", fn_process, polling_pingpong),
    ):
        rows.append(
            {"name": name, "value": value, "unit": "us", "floor": base, "ratio": value / base}
        )
    rows.append(
        {
            "name": "crash to next answer (median)",
            "value": crash,
            "unit": "s",
            "floor": 1.0,
            "ratio": crash,
            "target": "< 1 s",
        }
    )
    for isolation in ("process", "none"):
        for echo in (True, False):
            value = _echo_ms(isolation, echo)
            rows.append(
                {
                    "name": f"{LINES} prints, {isolation}, echo {'on' if echo else 'off'}",
                    "value": value,
                    "unit": "ms",
                    "floor": devnull,
                    "ratio": value / devnull,
                }
            )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for row in run():
        print(row)
