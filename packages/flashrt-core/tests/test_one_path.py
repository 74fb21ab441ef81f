"""One request path: every request shape goes the same way through the executor (or the
in-process pipeline), and what used to need a lane of its own still holds on it.

Shapes: plain code, dependencies already installed, local ``modules``, a class method on a kept
instance, async code, a queue envelope as raw JSON bytes. The executor's state is read through
``Runtime.describe()``, never through the supervisor's attributes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from flashrt_core import hookimpl

ADD = "def add(a, b):\n    return a + b\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.n = start\n"
    "    def bump(self, by):\n        self.n += by\n        return self.n\n"
)
ASYNC_ADD = "import asyncio\nasync def add(a, b):\n    await asyncio.sleep(0)\n    return a + b\n"
#: Waits (up to 10 s) for a file that only SETTER creates: the two must not wait on each other.
WAITER = (
    "def wait_for(path):\n    import os, time\n"
    "    for _ in range(1000):\n"
    "        if os.path.exists(path):\n            return 'seen'\n"
    "        time.sleep(0.01)\n"
    "    return 'never seen'\n"
)
SETTER = "def touch(path):\n    open(path, 'w').close()\n    return 'set'\n"
ASYNC_HOLDER = """
import asyncio

class Holder:
    async def make(self):
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        return 'made'

    async def wait(self):
        assert asyncio.get_running_loop() is self.loop
        await asyncio.wait_for(self.event.wait(), 10)
        return 'woken'

    async def wake(self):
        assert asyncio.get_running_loop() is self.loop
        self.event.set()
        return 'woke'
"""


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_every_request_shape_is_answered_on_the_one_path(make_worker, wire, isolation):
    # The installers' plugins are loaded: a dependency already installed is checked, not run.
    worker = make_worker(isolation=isolation, autoload=True, blocked_plugins=())
    assert wire.dec(worker.execute(wire.function(ADD, "add", 2, 3))) == 5

    with_deps = dict(wire.function(ADD, "add", 4, 5), dependencies=["msgspec", "cloudpickle>=2"])
    response = worker.execute(with_deps)
    assert wire.dec(response) == 9
    assert "installed" not in (response.stdout or "")  # nothing to install, nothing said

    with_module = wire.function(
        "def f():\n    import one_path_helper\n    return one_path_helper.X\n", "f"
    )
    with_module["modules"] = {"one_path_helper.py": "X = 7\n"}
    assert wire.dec(worker.execute(with_module)) == 7

    ctor = ((10,), {})
    first = worker.execute(wire.method(COUNTER, "Counter", "bump", 1, instance_id="c", ctor=ctor))
    again = worker.execute(wire.method(COUNTER, "Counter", "bump", 2, instance_id="c", ctor=ctor))
    assert (wire.dec(first), wire.dec(again)) == (11, 13)  # the instance was kept

    assert wire.dec(worker.execute(wire.function(ASYNC_ADD, "add", 1, 1))) == 2

    envelope = json.dumps({"input": wire.json_function(ADD, "add", 20, 22)}).encode()
    assert wire.dec(worker.execute(envelope)) == 42


def test_the_supervisor_describes_its_executors(make_worker, wire):
    worker = make_worker(isolation="process", spare=False)
    assert wire.dec(worker.execute(wire.function(ADD, "add", 1, 1))) == 2
    described = worker.rt.describe()
    assert described is not None
    [serving] = described.executors
    assert serving.role == "serving"
    assert (serving.load, serving.instances, serving.abandoned) == (0, 0, 0)
    assert described.in_flight == 0
    assert described.problem is None
    assert make_worker(isolation="none").rt.describe() is None


def test_a_long_sync_call_does_not_hold_up_the_next_request(make_worker, wire, tmp_path):
    """The first call holds the main thread; the second runs beside it, in the pool."""
    worker = make_worker(isolation="process")
    flag = tmp_path / "flag"

    async def both() -> tuple[Any, Any]:
        first = asyncio.ensure_future(
            worker.rt.execute(wire.function(WAITER, "wait_for", str(flag)))
        )
        await asyncio.sleep(0.2)  # the waiter is on the executor's main thread by now
        second = await worker.rt.execute(wire.function(SETTER, "touch", str(flag)))
        return await first, second

    first, second = worker.run(both())
    assert (wire.dec(first), wire.dec(second)) == ("seen", "set")


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_async_code_of_every_request_shares_one_event_loop(make_worker, wire, isolation):
    worker = make_worker(isolation=isolation)

    def call(method: str) -> dict[str, Any]:
        return wire.method(ASYNC_HOLDER, "Holder", method, instance_id="holder")

    assert wire.dec(worker.execute(call("make"))) == "made"

    async def both() -> tuple[Any, Any]:
        waiting = asyncio.ensure_future(worker.rt.execute(call("wait")))
        await asyncio.sleep(0.2)
        woke = await worker.rt.execute(call("wake"))
        return await waiting, woke

    waited, woke = worker.run(both())
    assert (wire.dec(waited), wire.dec(woke)) == ("woken", "woke")


def test_a_concurrent_burst_is_answered_in_full(make_worker, wire):
    worker = make_worker(isolation="process")

    async def client(n: int) -> list[int]:
        out = []
        for i in range(n):
            out.append(wire.dec(await worker.rt.execute(wire.function(ADD, "add", i, 1))))
        return out

    async def burst() -> list[list[int]]:
        return list(await asyncio.wait_for(asyncio.gather(*(client(50) for _ in range(16))), 120))

    assert worker.run(burst()) == [list(range(1, 51))] * 16
    described = worker.rt.describe()
    assert described is not None and described.in_flight == 0


def test_async_code_past_its_limit_is_cancelled_not_recycled(make_worker, wire):
    worker = make_worker(isolation="process", hard_timeout_grace_s=1.0)
    pid = "def pid():\n    import os\n    return os.getpid()\n"
    before = wire.dec(worker.execute(wire.function(pid, "pid")))
    request = wire.function(
        "import asyncio\nasync def slow():\n    await asyncio.sleep(60)\n", "slow"
    )
    request["timeout_s"] = 0.3
    assert "timed out after 0.3 s" in worker.execute(request).error
    worker.run(asyncio.sleep(1.5))  # past the grace: a recycle would have happened by now
    assert wire.dec(worker.execute(wire.function(pid, "pid"))) == before


WHERE = "def where():\n    import threading\n    return threading.current_thread().name\n"


class _PluginExecutors:
    """A third-party executor: ``plug_sync`` only calls the code, ``plug_async`` awaits the loop
    first; it declines every other function, which the built-in executor then serves."""

    @hookimpl
    def flashrt_execute_function(self, request: Any, call: Any) -> Any:
        if request.function_name == "plug_sync":
            return self._sync(call)
        if request.function_name == "plug_async":
            return self._async(call)
        return None

    async def _sync(self, call: Any) -> list[Any]:
        fn = call.load_code(WHERE, "where")["where"]
        return ["plugin", await call.call(fn)]

    async def _async(self, call: Any) -> list[Any]:
        await asyncio.sleep(0.01)  # needs a running loop: the executor's
        fn = call.load_code(WHERE, "where")["where"]
        return ["plugin", asyncio.get_running_loop().is_running(), await call.call(fn)]


def test_plugin_executors_take_the_same_path(make_worker, wire):
    worker = make_worker(isolation="process", extra_plugins=(_PluginExecutors(),))
    # Declined: the built-in executor runs it, its sync code on the main thread.
    assert wire.dec(worker.execute(wire.function(WHERE, "where"))) == "MainThread"
    assert wire.dec(worker.execute(wire.function(WHERE, "plug_sync"))) == ["plugin", "MainThread"]
    assert wire.dec(worker.execute(wire.function(WHERE, "plug_async"))) == [
        "plugin",
        True,
        "MainThread",
    ]
