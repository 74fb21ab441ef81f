"""A pool of executors (``FLASHRT_EXECUTORS``), through ``Runtime.execute``: sync user code uses
every core, a class instance stays where it was built, and one executor's death leaves the
others' requests alone. Installs seen across executors are tested in flashrt-installers'
``test_venv_installs.py`` (a real install needs a throwaway environment).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
from flashrt_core import Runtime, Settings, load_settings
from flashrt_core.settings import SettingsError, executor_count

SPIN = (
    "def spin(seconds):\n    import os, time\n    started = time.monotonic()\n"
    "    while time.monotonic() - started < seconds:\n        pass\n"
    "    return [os.getpid(), started, time.monotonic()]\n"
)
NAP = "def nap(seconds):\n    import os, time\n    time.sleep(seconds)\n    return os.getpid()\n"
COUNTER = (
    "class Counter:\n    def __init__(self):\n        self.n = 0\n"
    "    def bump(self):\n        import os\n        self.n += 1\n"
    "        return [self.n, os.getpid()]\n"
)


def _pool(make_worker: Any, executors: str, **settings: Any) -> Any:
    """A worker whose pool is full (the first executor serves at once, the rest join it)."""
    worker = make_worker(isolation="process", executors=executors, **settings)
    worker.execute({"function_name": "f", "function_code": "def f():\n    return 1\n"})
    size = executor_count(executors)

    async def full() -> None:
        while len(worker.rt.describe().pids("serving")) < size:
            await asyncio.sleep(0.02)

    worker.run(asyncio.wait_for(full(), 30))
    return worker


def _gather(worker: Any, *bodies: Any) -> list[Any]:
    async def all_of() -> list[Any]:
        return list(await asyncio.gather(*(worker.rt.execute(b) for b in bodies)))

    return worker.run(all_of())  # type: ignore[no-any-return]


def test_n_executors_run_n_cpu_bound_calls_at_once(make_worker, wire):
    worker = _pool(make_worker, "2")
    answers = _gather(worker, *(wire.function(SPIN, "spin", 0.4) for _ in range(2)))
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = (wire.dec(a) for a in answers)
    assert pid_a != pid_b  # each in a process of its own
    assert start_a < end_b and start_b < end_a  # at the same time


def test_one_executor_is_todays_single_process(make_worker, wire):
    worker = _pool(make_worker, "1")
    answers = _gather(worker, *(wire.function(NAP, "nap", 0.2) for _ in range(3)))
    assert len({wire.dec(a) for a in answers}) == 1
    assert len(worker.rt.describe().pids("serving")) == 1


def test_auto_is_the_cpus_the_worker_may_use(make_worker, wire):
    cpus = len(os.sched_getaffinity(0))
    assert executor_count("auto") == cpus
    worker = _pool(make_worker, "auto")
    assert len(worker.rt.describe().pids("serving")) == cpus


@pytest.mark.parametrize("value", ["0", "-2", "many", ""])
def test_a_bad_executor_count_is_refused_naming_the_setting(value):
    with pytest.raises(SettingsError, match="FLASHRT_EXECUTORS"):
        Runtime(load_settings(Settings, {}, disable_plugin_autoload=True, executors=value))


def test_a_kept_instance_keeps_its_state_over_concurrent_clients(make_worker, wire):
    worker = _pool(make_worker, "2")

    def bump(instance: str) -> dict[str, Any]:
        return wire.method(COUNTER, "Counter", "bump", instance_id=instance)

    async def client(instance: str) -> list[Any]:
        return [wire.dec(await worker.rt.execute(bump(instance))) for _ in range(25)]

    async def clients() -> list[list[Any]]:
        return list(await asyncio.gather(*(client(f"counter-{i % 2}") for i in range(8))))

    seen: dict[str, list[Any]] = {"counter-0": [], "counter-1": []}
    for index, answers in enumerate(worker.run(clients())):
        seen[f"counter-{index % 2}"] += answers
    for answers in seen.values():
        assert sorted(n for n, _ in answers) == list(range(1, 101))  # no call lost or repeated
        assert len({pid for _, pid in answers}) == 1  # all on the executor that holds it


def test_one_executor_killed_under_load_leaves_the_others_requests_alone(make_worker, wire):
    worker = _pool(make_worker, "2")
    victim = worker.rt.describe().pids("serving")[0]

    async def scenario() -> list[Any]:
        calls = [
            asyncio.ensure_future(worker.rt.execute(wire.function(NAP, "nap", 1.0)))
            for _ in range(4)
        ]
        await asyncio.sleep(0.4)
        os.kill(victim, signal.SIGKILL)
        return list(await asyncio.gather(*calls))

    answers = worker.run(scenario())
    retried = [a for a in answers if "running it again" in (a.stdout or "")]
    untouched = [a for a in answers if a not in retried]
    assert len(retried) == 2 and len(untouched) == 2  # two on each executor
    for answer in answers:
        assert answer.success, answer.error
        assert wire.dec(answer) != victim
    untouched_on = {wire.dec(a) for a in untouched}
    assert len(untouched_on) == 1  # the surviving executor, never disturbed
    retried_on = {wire.dec(a) for a in retried}
    assert len(retried_on) == 2 and not retried_on & untouched_on  # each alone elsewhere
    assert len(worker.rt.describe().pids("serving")) == 2  # the spare took the victim's place
