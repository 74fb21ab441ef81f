"""Runtime.execute on a trivial function against doing the same work in plain Python."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N = 3000


def _floor_us(body: dict[str, Any]) -> float:
    import cloudpickle

    def add(a: int, b: int, scale: int = 1) -> int:
        return (a + b) * scale

    def once() -> str:
        args = [cloudpickle.loads(base64.b64decode(a)) for a in body["args"]]
        kwargs = {k: cloudpickle.loads(base64.b64decode(v)) for k, v in body["kwargs"].items()}
        return base64.b64encode(cloudpickle.dumps(add(*args, **kwargs))).decode()

    return _best_of(once)


def _hop_floor_us(body: dict[str, Any]) -> float:
    """The same plain work with the call moved to a worker thread, as the runtime must do."""
    from concurrent.futures import ThreadPoolExecutor

    import cloudpickle

    def add(a: int, b: int, scale: int = 1) -> int:
        return (a + b) * scale

    async def main() -> float:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(4)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(N):
                args = [cloudpickle.loads(base64.b64decode(a)) for a in body["args"]]
                kwargs = {
                    k: cloudpickle.loads(base64.b64decode(v)) for k, v in body["kwargs"].items()
                }
                value = await loop.run_in_executor(pool, functools.partial(add, *args, **kwargs))
                base64.b64encode(cloudpickle.dumps(value)).decode()
            samples.append((time.perf_counter() - start) / N * 1e6)
        pool.shutdown()
        return min(samples)

    return asyncio.run(main())


def _best_of(fn: Any, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(N):
            fn()
        samples.append((time.perf_counter() - start) / N * 1e6)
    return min(samples)


def _runtime_us(body: dict[str, Any]) -> tuple[float, float]:
    from flashrt_core import Runtime, Settings

    async def main() -> tuple[float, float]:
        runtime = Runtime(Settings(disable_plugin_autoload=True))
        await runtime.start()
        # The example prints; a silent twin isolates the pipeline from print's own cost.
        silent = dict(body, function_code=body["function_code"].replace("print(", "str("))
        results = []
        for request in (body, silent):
            for _ in range(200):
                await runtime.execute(request)
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(N):
                    await runtime.execute(request)
                samples.append((time.perf_counter() - start) / N * 1e6)
            results.append(min(samples))
        await runtime.shutdown()
        return results[0], results[1]

    return asyncio.run(main())


def _import_ms() -> tuple[float, float]:
    """Import time of flashrt_core (-X importtime, cumulative), and of `json` as a yardstick."""

    def cumulative(module: str) -> float:
        best = float("inf")
        for _ in range(5):
            err = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", f"import {module}"],
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            for line in err.splitlines():
                m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line.strip())
                if m and m.group(2) == module:
                    best = min(best, int(m.group(1)) / 1000)
        return best

    return cumulative("flashrt_core"), cumulative("json")


def run() -> list[dict[str, Any]]:
    body = json.loads((ROOT / "examples" / "add.json").read_text())["input"]
    floor = _floor_us(body)
    hop_floor = _hop_floor_us(body)
    with_print, silent = _runtime_us(body)
    imp, json_imp = _import_ms()
    return [
        {
            "name": "Runtime.execute add() warm, silent (per request)",
            "value": silent,
            "unit": "us",
            "floor": floor,
            "ratio": silent / floor,
        },
        {
            "name": "Runtime.execute add() warm, silent, vs thread-hop floor",
            "value": silent,
            "unit": "us",
            "floor": hop_floor,
            "ratio": silent / hop_floor,
        },
        {
            "name": "Runtime.execute add() warm, with print (per request)",
            "value": with_print,
            "unit": "us",
            "floor": floor,
            "ratio": with_print / floor,
        },
        {
            "name": "import flashrt_core (cumulative, -X importtime)",
            "value": imp,
            "unit": "ms",
            "floor": json_imp,
            "ratio": imp / json_imp,
            "target": "< 50 ms",
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
