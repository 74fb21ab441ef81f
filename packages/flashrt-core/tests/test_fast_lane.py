"""The executor's fast lane: which requests take it, and that nothing changes for them but speed.

A simple request (code, no installs, no modules) that is alone in flight runs on the executor's
main thread, read straight from its own socket; everything else goes through the executor's event
loop. ``supervisor.lanes`` counts the hand-overs. The behaviours of ``test_executor.py`` run on
both lanes there; these are the ones that only exist because there are two.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from flashrt_core import hookimpl

SLEEPER = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"
#: Waits (up to 10 s) for a file that only SETTER creates: the two must not wait on each other.
WAITER = (
    "def wait_for(path):\n    import os, time\n"
    "    for _ in range(1000):\n"
    "        if os.path.exists(path):\n            return 'seen'\n"
    "        time.sleep(0.01)\n"
    "    return 'never seen'\n"
)
SETTER = "def touch(path):\n    open(path, 'w').close()\n    return 'set'\n"


def _worker(make_worker, **settings):
    return make_worker(isolation="process", **settings)


def _lanes(worker) -> dict[str, int]:
    return dict(worker.rt.supervisor.lanes)


def test_simple_requests_take_the_fast_lane_and_the_others_the_loop(make_worker, wire, tmp_path):
    worker = _worker(make_worker)
    add = "def add(a, b):\n    return a + b\n"
    before = _lanes(worker)
    assert wire.dec(worker.execute(wire.function(add, "add", 1, 2))) == 3
    counter = "class C:\n    def one(self):\n        return 1\n"
    assert wire.dec(worker.execute(wire.method(counter, "C", "one", instance_id="c"))) == 1
    body = json.dumps({"input": wire.function(add, "add", 2, 2)}).encode()
    assert wire.dec(worker.execute(body)) == 4
    after_simple = _lanes(worker)
    assert after_simple["fast"] - before["fast"] == 3
    assert after_simple["loop"] == before["loop"]

    with_module = wire.function("def f():\n    import helper\n    return helper.X\n", "f")
    with_module["modules"] = {"helper.py": "X = 5\n"}
    assert wire.dec(worker.execute(with_module)) == 5
    assert _lanes(worker)["loop"] == after_simple["loop"] + 1


def test_the_fast_lane_can_be_turned_off(make_worker, wire):
    worker = _worker(make_worker, fast_lane=False)
    assert wire.dec(worker.execute(wire.function("def f():\n    return 1\n", "f"))) == 1
    assert _lanes(worker)["fast"] == 0


WHERE = "def where():\n    import threading\n    return threading.current_thread().name\n"


class _PluginExecutors:
    """A third-party executor: ``plug_sync`` only calls the code, ``plug_async`` awaits the loop
    first; it declines every other function, which the built-in executor then serves."""

    @hookimpl
    def flashrt_execute_function(self, request, call):
        if request.function_name == "plug_sync":
            return self._sync(call)
        if request.function_name == "plug_async":
            return self._async(call)
        return None

    async def _sync(self, call):
        fn = call.load_code(WHERE, "where")["where"]
        return ["plugin", await call.call(fn)]

    async def _async(self, call):
        await asyncio.sleep(0.01)  # needs a running loop: the executor's
        fn = call.load_code(WHERE, "where")["where"]
        return ["plugin", asyncio.get_running_loop().is_running(), await call.call(fn)]


def test_plugin_executors_keep_the_fast_lane(make_worker, wire):
    worker = _worker(make_worker, extra_plugins=(_PluginExecutors(),))
    # Declined: the built-in executor runs it, on the main thread, from the fast lane.
    assert wire.dec(worker.execute(wire.function(WHERE, "where"))) == "MainThread"
    # A plugin that only calls the code, and one that needs the event loop: both answered from
    # the fast lane, the sync code on the main thread.
    assert wire.dec(worker.execute(wire.function(WHERE, "plug_sync"))) == ["plugin", "MainThread"]
    assert wire.dec(worker.execute(wire.function(WHERE, "plug_async"))) == [
        "plugin",
        True,
        "MainThread",
    ]
    lanes = _lanes(worker)
    assert lanes["fast"] == 3 and lanes["loop"] == 0


def test_a_request_alone_in_the_fast_lane_does_not_block_the_next_one(make_worker, wire, tmp_path):
    worker = _worker(make_worker)
    flag = tmp_path / "flag"

    async def both():
        first = asyncio.ensure_future(
            worker.rt.execute(wire.function(WAITER, "wait_for", str(flag)))
        )
        await asyncio.sleep(0.2)  # the waiter is on the executor's main thread by now
        second = await worker.rt.execute(wire.function(SETTER, "touch", str(flag)))
        return await first, second

    first, second = worker.run(both())
    assert (wire.dec(first), wire.dec(second)) == ("seen", "set")
    lanes = _lanes(worker)
    assert lanes["fast"] >= 1 and lanes["loop"] >= 1


def test_a_simple_request_is_not_held_behind_a_sync_call_on_the_main_thread(
    make_worker, wire, tmp_path
):
    worker = _worker(make_worker)
    flag = tmp_path / "flag"
    waiter = wire.function(
        "def wait_for(path):\n    import os, time, helper\n"
        "    for _ in range(1000):\n"
        "        if os.path.exists(path):\n            return helper.SEEN\n"
        "        time.sleep(0.01)\n"
        "    return 'never seen'\n",
        "wait_for",
        str(flag),
    )
    waiter["modules"] = {"helper.py": "SEEN = 'seen'\n"}  # not simple: the loop runs it

    async def both():
        first = asyncio.ensure_future(worker.rt.execute(waiter))
        await asyncio.sleep(0.2)
        second = await worker.rt.execute(wire.function(SETTER, "touch", str(flag)))
        return await first, second

    first, second = worker.run(both())
    assert (wire.dec(first), wire.dec(second)) == ("seen", "set")


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


def test_async_code_from_either_lane_shares_the_executors_one_event_loop(make_worker, wire):
    worker = _worker(make_worker)

    def call(method):
        return wire.method(ASYNC_HOLDER, "Holder", method, instance_id="holder")

    assert wire.dec(worker.execute(call("make"))) == "made"  # the fast lane: alone in flight

    async def both():
        waiting = asyncio.ensure_future(worker.rt.execute(call("wait")))
        await asyncio.sleep(0.2)
        woke = await worker.rt.execute(call("wake"))  # the loop: "wait" is in flight
        return await waiting, woke

    waited, woke = worker.run(both())
    assert (wire.dec(waited), wire.dec(woke)) == ("woken", "woke")


def test_async_code_past_its_limit_in_the_fast_lane_is_cancelled_not_recycled(make_worker, wire):
    worker = _worker(make_worker, hard_timeout_grace_s=1.0)
    pid = "def pid():\n    import os\n    return os.getpid()\n"
    before = wire.dec(worker.execute(wire.function(pid, "pid")))
    request = wire.function(
        "import asyncio\nasync def slow():\n    await asyncio.sleep(60)\n", "slow"
    )
    request["timeout_s"] = 0.3
    response = worker.execute(request)
    assert "timed out after 0.3 s" in response.error
    worker.run(asyncio.sleep(1.5))  # past the grace: a recycle would have happened by now
    assert wire.dec(worker.execute(wire.function(pid, "pid"))) == before


def test_a_body_only_the_loop_can_explain_is_answered_by_it(make_worker, wire):
    worker = _worker(make_worker)
    nameless = {"function_code": "def f():\n    return 1\n"}  # looks simple; has no name
    response = worker.execute(nameless)
    assert response.success is False
    assert "function_name is required" in response.error
    assert wire.dec(worker.execute(wire.function("def f():\n    return 1\n", "f"))) == 1


def test_back_to_back_fast_requests_still_let_the_event_loop_run(make_worker, wire):
    worker = _worker(make_worker)
    request = wire.function("def f():\n    return 1\n", "f")
    ticks = [0]

    async def ticker():
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    async def burst():
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ticks[0] = 0
        for _ in range(500):
            response = await worker.rt.execute(request)
            assert response.success, response.error
        task.cancel()
        return ticks[0]

    assert worker.run(burst()) > 0


def test_a_concurrent_burst_over_both_lanes_is_answered_in_full(make_worker, wire):
    worker = _worker(make_worker)
    add = "def add(a, b):\n    return a + b\n"

    async def client(n: int) -> list[int]:
        out = []
        for i in range(n):
            response = await worker.rt.execute(wire.function(add, "add", i, 1))
            out.append(wire.dec(response))
        return out

    async def burst():
        return await asyncio.wait_for(asyncio.gather(*(client(100) for _ in range(16))), 120)

    results = worker.run(burst())
    assert results == [list(range(1, 101))] * 16
    lanes = _lanes(worker)
    assert lanes["fast"] >= 1 and lanes["loop"] >= 1


def test_concurrent_simple_requests_run_whole_on_the_main_thread(make_worker, wire):
    """Under load the main thread runs simple request after request (no thread hop each), so
    their sync code keeps what only the main thread has (``signal.signal`` works there)."""
    worker = _worker(make_worker)
    where = (
        "def where(i):\n    import threading\n"
        "    return threading.current_thread() is threading.main_thread()\n"
    )

    async def client() -> list[bool]:
        return [
            wire.dec(await worker.rt.execute(wire.function(where, "where", i))) for i in range(25)
        ]

    async def burst():
        return await asyncio.wait_for(asyncio.gather(*(client() for _ in range(8))), 120)

    on_main = [flag for results in worker.run(burst()) for flag in results]
    assert len(on_main) == 200
    # A request finding the main thread busy past a moment runs as the loop's (in the pool).
    assert sum(on_main) >= 100, sum(on_main)


def test_a_simple_request_queued_behind_a_slow_one_is_taken_back(make_worker, wire, tmp_path):
    """Both simple: the second queues for the main thread behind the first, which waits for
    what only the second does. It is taken back and run elsewhere, or both would hang."""
    worker = _worker(make_worker)
    flag = tmp_path / "flag"

    async def both():
        return await asyncio.gather(
            worker.rt.execute(wire.function(WAITER, "wait_for", str(flag))),
            worker.rt.execute(wire.function(SETTER, "touch", str(flag))),
        )

    first, second = worker.run(both())
    assert (wire.dec(first), wire.dec(second)) == ("seen", "set")


def _cpu_s(pid: int) -> float:
    """CPU time (user + system) process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_executor_told_a_request_is_coming_polls_for_it(make_worker, wire):
    worker = _worker(make_worker)
    add = wire.function("def add(a, b):\n    return a + b\n", "add", 1, 2)
    assert wire.dec(worker.execute(add)) == 3
    pid = worker.rt.supervisor.serving.pool[0].proc.pid

    def cpu_while_idle(expect: bool) -> float:
        before = _cpu_s(pid)
        for _ in range(100):
            if expect:
                worker.rt.expect()
            time.sleep(0.003)  # longer than it polls after an answer or an Expect
        return _cpu_s(pid) - before

    quiet = cpu_while_idle(expect=False)
    told = cpu_while_idle(expect=True)
    # Each announcement keeps it polling for 0.5 ms (50 ms in all); left alone it sleeps.
    assert told - quiet >= 0.02, (quiet, told)
    assert wire.dec(worker.execute(add)) == 3
    assert _lanes(worker)["fast"] >= 2


def test_expect_costs_nothing_where_nothing_sleeps(make_worker, wire):
    worker = make_worker()  # either isolation: in-process there is no executor to wake
    worker.rt.expect()
    add = wire.function("def add(a, b):\n    return a + b\n", "add", 2, 2)
    assert wire.dec(worker.execute(add)) == 4
    worker.rt.expect()
    worker.rt.expect()  # told twice in a row: the executor is already polling
    assert wire.dec(worker.execute(add)) == 4
