"""Recovery under load: what a crashing request costs everyone else.

- Through ``Runtime.execute``: the harmless request after each of 8 culprits in a row; the next
  request after a poison and after a hard-timeout recycle; the time a request killed by another's
  ``threading.Timer`` loses beyond its own run; ``import numpy`` in the first request after a
  recycle. Each is reported against the issue's target (``floor`` = the target, ratio <= 1 met).
- ``flashrt-lb`` under a mixed load (8 clients: trivial calls, chatty output, a kept class
  instance, exceptions, an install of ``six``) for ``FLASHRT_BENCH_SOAK_S`` seconds (60 by
  default) each: without crashing requests (the floor), with 0.2 % and with 2 % of requests
  calling ``os._exit(3)``. Innocent failures, the slowest ``/ping`` and the worker's memory are
  reported too.

numpy comes from a ``uv pip install --target`` directory under ``.bench/`` (made once), put on
``PYTHONPATH``, so the workspace's environment is left as it is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOAK_S = float(os.environ.get("FLASHRT_BENCH_SOAK_S", "60"))
CLIENTS = 8

PID = "def pid():\n    import os\n    return os.getpid()\n"
CULPRIT = "def culprit():\n    import os\n    os._exit(3)\n"
POISON = "def poison():\n    import sys\n    sys.modules['cloudpickle'] = None\n    return 1\n"
NAP = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"
TIMER = (
    "def arm():\n    import os, threading\n"
    "    threading.Timer(0.3, os._exit, (7,)).start()\n    return 'armed'\n"
)
NUMPY = (
    "def numpy_import():\n    import time\n    started = time.perf_counter()\n"
    "    import numpy\n    return time.perf_counter() - started\n"
)


def _enc(value: Any) -> str:
    import cloudpickle

    return base64.b64encode(cloudpickle.dumps(value)).decode()


def _dec(response: Any) -> Any:
    import cloudpickle

    assert response.success, response.error
    return cloudpickle.loads(base64.b64decode(response.result))


def _fn(code: str, name: str, *args: Any, **extra: Any) -> dict[str, Any]:
    return {
        "function_name": name,
        "function_code": code,
        "args": [_enc(a) for a in args],
        "kwargs": {},
        **extra,
    }


def _numpy_dir() -> Path:
    target = ROOT / ".bench" / "numpy-target"
    if not (target / "numpy").is_dir():
        subprocess.run(
            ["uv", "pip", "install", "--quiet", "--target", str(target), "numpy"], check=True
        )
    return target


# --- through Runtime.execute ---------------------------------------------------------------


async def _runtime_figures() -> dict[str, float]:
    from flashrt_core import Runtime, Settings, load_settings

    settings = load_settings(
        Settings,
        {},
        disable_plugin_autoload=True,
        timing_log=False,
        echo=False,
        hard_timeout_grace_s=0.2,
    )
    runtime = Runtime(settings)
    figures: dict[str, float] = {}
    try:
        _dec(await runtime.execute(_fn(PID, "pid")))
        await _until_spare(runtime)
        after = []
        for _ in range(8):
            await runtime.execute(_fn(CULPRIT, "culprit"))
            started = time.perf_counter()
            _dec(await runtime.execute(_fn(PID, "pid")))
            after.append(time.perf_counter() - started)
        figures["culprits"] = max(after)

        await _until_spare(runtime)
        await runtime.execute(_fn(POISON, "poison"))
        started = time.perf_counter()
        _dec(await runtime.execute(_fn(PID, "pid")))
        figures["poison"] = time.perf_counter() - started

        await _until_spare(runtime)
        before = runtime.describe().replacements
        await runtime.execute(_fn(NAP, "nap", 30, timeout_s=0.3))
        while runtime.describe().replacements == before:  # noqa: ASYNC110 - recycled after the grace
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        _dec(await runtime.execute(_fn(PID, "pid")))
        figures["timeout"] = time.perf_counter() - started

        await _until_spare(runtime)
        _dec(await runtime.execute(_fn(TIMER, "arm")))
        started = time.perf_counter()
        _dec(await runtime.execute(_fn(NAP, "nap", 1.0)))
        figures["timer"] = time.perf_counter() - started - 1.0

        figures["numpy_cold"] = _dec(await runtime.execute(_fn(NUMPY, "numpy_import")))
        await asyncio.sleep(1.0)  # the spare's preload runs meanwhile
        await runtime.execute(_fn(CULPRIT, "culprit"))
        figures["numpy"] = _dec(await runtime.execute(_fn(NUMPY, "numpy_import")))
    finally:
        await runtime.shutdown()
    return figures


async def _until_spare(runtime: Any) -> None:
    for _ in range(500):
        if runtime.describe().pids("spare"):
            return
        await asyncio.sleep(0.01)


# --- flashrt-lb under a mixed load ---------------------------------------------------------

COUNTER = (
    "class Counter:\n    def __init__(self):\n        self.n = 0\n"
    "    def bump(self):\n        self.n += 1\n        return self.n\n"
)


def _mixed_bodies() -> dict[str, bytes]:
    bodies: dict[str, dict[str, Any]] = {
        "add": _fn("def add(a, b):\n    return a + b\n", "add", 2, 3),
        "chatty": _fn(
            "def chatty():\n    for i in range(20):\n        print('line', i)\n    return 20\n",
            "chatty",
        ),
        "raises": _fn("def bad():\n    raise ValueError('expected')\n", "bad"),
        "six": _fn(
            "def uses_six():\n    import six\n    return six.PY3\n",
            "uses_six",
            dependencies=["six"],
        ),
        "culprit": _fn(CULPRIT, "culprit"),
    }
    encoded = {name: json.dumps(body).encode() for name, body in bodies.items()}
    for client in range(CLIENTS):
        method = {
            "execution_type": "class",
            "class_name": "Counter",
            "class_code": COUNTER,
            "method_name": "bump",
            "args": [],
            "kwargs": {},
            "constructor_args": [],
            "constructor_kwargs": {},
            "instance_id": f"counter-{client}",
        }
        encoded[f"method-{client}"] = json.dumps(method).encode()
    return encoded


def _right(kind: str, payload: dict[str, Any]) -> bool:
    import cloudpickle

    if kind == "raises":
        return payload.get("success") is False and "ValueError" in (payload.get("error") or "")
    if kind == "culprit":
        return payload.get("success") is False
    if payload.get("success") is not True:
        return False
    value = cloudpickle.loads(base64.b64decode(payload["result"]))
    if kind == "add":
        return bool(value == 5)
    if kind == "chatty":
        return value == 20 and (payload.get("stdout") or "").count("line") >= 20
    if kind == "six":
        return value is True
    return isinstance(value, int) and value >= 1  # the counter (rebuilt after a death)


def _client(
    port: int, index: int, rate: float, until: float, bodies: dict[str, bytes], out: dict[str, Any]
) -> None:
    rng = random.Random(index)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    kinds = ["add", "add", "add", "chatty", "raises", "six", f"method-{index}"]
    while time.monotonic() < until:
        kind = "culprit" if rng.random() < rate else rng.choice(kinds)
        conn.request("POST", "/execute", bodies[kind], headers)
        response = conn.getresponse()
        payload = json.loads(response.read())
        out["done"] += 1
        if kind == "culprit":
            out["culprits"] += 1
        elif not _right(kind.split("-")[0], payload):
            out["innocent_failures"] += 1
            out.setdefault("examples", []).append((kind, payload.get("error")))
    conn.close()


def _pinger(port: int, until: float, out: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < until:
        started = time.perf_counter()
        conn.request("GET", "/ping")
        conn.getresponse().read()
        out["ping_max"] = max(out.get("ping_max", 0.0), time.perf_counter() - started)
        time.sleep(0.1)
    conn.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(rate: float, **extra_env: str) -> dict[str, Any]:
    """The mixed load on a fresh ``flashrt-lb`` for ``SOAK_S`` seconds, ``rate`` of requests
    crashing their executor."""
    from flashrt_lb.testing import WorkerProcess

    bodies = _mixed_bodies()
    env = {"FLASHRT_DISABLE_VOLUME_CACHE": "1", "FLASHRT_LOG_LEVEL": "WARNING", **extra_env}
    with WorkerProcess(env) as worker:
        status, _ = worker.wait_ready(timeout=60)
        if status != 200:
            raise RuntimeError(f"flashrt-lb not ready ({status}):\n{worker.output()}")
        warm = {"done": 0, "culprits": 0, "innocent_failures": 0}
        _client(worker.port, 0, 0.0, time.monotonic() + 2, bodies, warm)  # installs six once
        rss_before = _rss_mb(worker.proc.pid)
        out: dict[str, Any] = {"done": 0, "culprits": 0, "innocent_failures": 0}
        until = time.monotonic() + SOAK_S
        threads = [
            threading.Thread(target=_client, args=(worker.port, i, rate, until, bodies, out))
            for i in range(CLIENTS)
        ]
        threads.append(threading.Thread(target=_pinger, args=(worker.port, until, out)))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out["rps"] = out["done"] / (time.perf_counter() - started)
        out["rss_before"], out["rss_after"] = rss_before, _rss_mb(worker.proc.pid)
    return out


def run() -> list[dict[str, Any]]:
    numpy_dir = _numpy_dir()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(numpy_dir), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(numpy_dir))
    figures = asyncio.run(_runtime_figures())
    rows: list[dict[str, Any]] = []
    for key, name, target in (
        ("culprits", "harmless request after each of 8 culprits in a row (max)", 0.6),
        ("poison", "next request after a poison recycle", 0.1),
        ("timeout", "next request after a hard-timeout recycle", 0.1),
        ("timer", "timer victim: time lost beyond its own 1 s run", 0.7),
        ("numpy", "import numpy in the first request after a recycle", 0.001),
        ("numpy_cold", "  (the same import in a fresh executor, for scale)", 0.001),
    ):
        value = figures[key]
        rows.append(
            {
                "name": f"{name} (floor: target)",
                "value": value,
                "unit": "s",
                "floor": target,
                "ratio": value / target,
            }
        )
    rows += soak_rows("lb mixed load, 8 clients")
    return rows


def soak_rows(title: str, **extra_env: str) -> list[dict[str, Any]]:
    """The soak without crashes (the floor), then with 0.2 % and 2 % crashing requests."""
    rows: list[dict[str, Any]] = []
    clean = soak(0.0, **extra_env)
    for rate, label in ((0.0, "no crashes"), (0.002, "0.2% crashing"), (0.02, "2% crashing")):
        result = clean if rate == 0.0 else soak(rate, **extra_env)
        rows.append(
            {
                "name": f"{title}, {label} (floor: no crashes)",
                "value": result["rps"],
                "unit": "req/s",
                "floor": clean["rps"],
                "ratio": result["rps"] / clean["rps"],
            }
        )
        rows.append(
            {
                "name": (
                    f"  {label}: {result['done']} answers, {result['culprits']} culprits, "
                    f"innocent failures {result['innocent_failures']}, slowest /ping "
                    f"{result.get('ping_max', 0) * 1000:.0f} ms, worker RSS "
                    f"{result['rss_before']:.0f} -> {result['rss_after']:.0f} MB"
                ),
                "value": result["innocent_failures"],
                "unit": "fails",
            }
        )
        with contextlib.suppress(KeyError):
            for kind, error in result["examples"][:3]:
                print(f"     innocent failure ({kind}): {str(error)[:300]}", flush=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
