"""The executor process through ``Runtime.execute``: whatever user code does, the worker answers.

Each test ends with the same runtime answering a plain request correctly. These run under
process isolation whatever ``FLASHRT_ISOLATION`` says: they are about the executor.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flashrt_core import encode_response, hookimpl

PID = "def pid():\n    import os\n    return os.getpid()\n"


#: One executor, and the same behaviours with a pool of two executors.
LANES = {
    "single": {},
    "pool": {"executors": "2"},
}


def _executor(make_worker, **settings):
    return make_worker(isolation="process", **settings)


@pytest.fixture(params=list(LANES))
def executor(make_worker, request):
    """``executor(**settings) -> Worker`` under process isolation, alone and in a pool."""

    def factory(**settings):
        return _executor(make_worker, **LANES[request.param], **settings)

    return factory


def _pid(worker, wire) -> int:
    response = worker.execute(wire.function(PID, "pid"))
    assert response.success, response.error
    return int(wire.dec(response))


def _alive(worker, wire) -> None:
    response = worker.execute(wire.function("def alive():\n    return 'alive'\n", "alive"))
    assert wire.dec(response) == "alive"


def test_user_code_runs_in_another_process(executor, wire):
    worker = executor()
    assert _pid(worker, wire) != os.getpid()


@pytest.mark.parametrize(
    ("code", "named"),
    [
        ("import os\nos._exit(7)", "exited with status 7"),
        (
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
            "killed by SIGKILL (out of memory?)",
        ),
        ("import ctypes\nctypes.string_at(0)", "killed by signal 11 (SIGSEGV)"),
    ],
)
def test_a_dying_executor_is_named_and_replaced(executor, wire, code, named):
    worker = executor()
    before = _pid(worker, wire)
    body = (
        "def die():\n    print('last words', flush=True)\n" + textwrap.indent(code, "    ") + "\n"
    )
    response = worker.execute(wire.function(body, "die"))
    assert response.success is False
    assert named in response.error
    assert "ran twice" in response.error  # retried once on a fresh executor, died again
    assert response.stdout.count("last words") == 2
    assert _pid(worker, wire) != before
    _alive(worker, wire)


def test_without_retries_the_request_fails_at_the_first_death(executor, wire):
    worker = executor(retry_on_executor_death=False)
    response = worker.execute(wire.function("def die():\n    import os\n    os._exit(3)\n", "die"))
    assert "exited with status 3" in response.error
    assert "ran twice" not in response.error
    _alive(worker, wire)


def test_an_innocent_request_killed_by_anothers_timer_is_retried_and_succeeds(executor, wire):
    worker = executor()
    timer = (
        "def arm():\n    import os, threading\n"
        "    threading.Timer(0.3, os._exit, (7,)).start()\n    return 'armed'\n"
    )
    assert wire.dec(worker.execute(wire.function(timer, "arm"))) == "armed"
    slow = "def innocent():\n    import time\n    time.sleep(1.0)\n    return 'fine'\n"
    response = worker.execute(wire.function(slow, "innocent"))
    assert response.success, response.error
    assert wire.dec(response) == "fine"
    assert "running it again" in response.stdout


def test_a_poisoned_interpreter_is_answered_then_replaced(executor, wire):
    worker = executor()
    before = _pid(worker, wire)
    poison = "def poison():\n    import sys\n    sys.modules['cloudpickle'] = None\n    return 1\n"
    response = worker.execute(wire.function(poison, "poison"))
    assert response.success, response.error
    for _ in range(3):
        _alive(worker, wire)
    assert _pid(worker, wire) != before


USE_JSON = "def use():\n    import json, os\n    return json.dumps([1]), os.getpid()\n"


@pytest.mark.parametrize(
    "replacement",
    ["None", "42", "types.ModuleType('json')"],
    ids=["none", "not-a-module", "another-module"],
)
def test_any_module_poisoned_in_sys_modules_recycles_the_executor(executor, wire, replacement):
    worker = executor()
    before = _pid(worker, wire)
    poison = (
        "def poison():\n    import sys, types\n"
        f"    sys.modules['json'] = {replacement}\n    return 'poisoned'\n"
    )
    assert wire.dec(worker.execute(wire.function(poison, "poison"))) == "poisoned"
    dumped, pid = wire.dec(worker.execute(wire.function(USE_JSON, "use")))
    assert dumped == "[1]"
    assert pid != before


@pytest.mark.parametrize(
    "change",
    [
        # Imported fresh by the request, then replaced: nothing before it relied on it.
        "import colorsys\n    sys.modules['colorsys'] = types.ModuleType('colorsys')",
        "del sys.modules['json']",
        "import importlib, json\n    importlib.reload(json)",
        "import json\n    del sys.modules['json']\n    import json",
    ],
    ids=["fresh-then-replaced", "deleted", "reloaded", "deleted-then-imported-again"],
)
def test_changes_to_sys_modules_that_poison_nothing_keep_the_executor(executor, wire, change):
    worker = executor()
    before = _pid(worker, wire)
    code = f"def change():\n    import sys, types\n    {change}\n    return 'changed'\n"
    assert wire.dec(worker.execute(wire.function(code, "change"))) == "changed"
    dumped, pid = wire.dec(worker.execute(wire.function(USE_JSON, "use")))
    assert dumped == "[1]"
    assert pid == before


def test_code_that_closes_every_descriptor_above_2_gets_its_result(executor, wire):
    worker = executor()
    closer = "def close_all():\n    import os\n    os.closerange(3, 65536)\n    return 'closed'\n"
    response = worker.execute(wire.function(closer, "close_all"))
    assert response.success, response.error
    assert wire.dec(response) == "closed"
    _alive(worker, wire)


def test_signal_handlers_can_be_installed_by_sync_code(executor, wire):
    worker = executor()
    code = (
        "def alarm():\n    import signal\n"
        "    fired = []\n"
        "    signal.signal(signal.SIGALRM, lambda *a: fired.append(1))\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0.05)\n"
        "    import time\n"
        "    for _ in range(100):\n"
        "        if fired:\n            break\n"
        "        time.sleep(0.01)\n"
        "    return bool(fired)\n"
    )
    assert wire.dec(worker.execute(wire.function(code, "alarm"))) is True
    _alive(worker, wire)


def test_a_runaway_sync_call_times_out_then_its_executor_is_recycled(executor, wire):
    worker = executor(hard_timeout_grace_s=0.3)
    before = _pid(worker, wire)
    request = wire.function("def spin():\n    while True:\n        pass\n", "spin")
    request["timeout_s"] = 0.5
    response = worker.execute(request)
    assert response.success is False
    assert "timed out after 0.5 s" in response.error
    for _ in range(100):  # the recycle follows the grace period
        after = _pid(worker, wire)
        if after != before:
            break
        time.sleep(0.05)
    assert after != before
    _alive(worker, wire)


def test_a_call_that_ends_within_the_grace_period_keeps_its_executor(executor, wire):
    worker = executor(hard_timeout_grace_s=5.0)
    before = _pid(worker, wire)
    request = wire.function("def nap():\n    import time\n    time.sleep(0.6)\n", "nap")
    request["timeout_s"] = 0.3
    assert "timed out after 0.3 s" in worker.execute(request).error
    time.sleep(0.6)
    assert _pid(worker, wire) == before


def test_a_lost_cuda_context_recycles_the_executor(executor, wire):
    worker = executor()
    before = _pid(worker, wire)
    code = (
        "def kernel():\n"
        "    raise RuntimeError('CUDA error: device-side assert triggered\\n"
        "CUDA kernel errors might be asynchronously reported')\n"
    )
    response = worker.execute(wire.function(code, "kernel"))
    assert response.success is False
    assert "device-side assert triggered" in response.error
    assert _pid(worker, wire) != before


def test_instances_die_with_the_executor_and_are_rebuilt(executor, wire):
    worker = executor(retry_on_executor_death=False)
    cls = (
        "class Counter:\n"
        "    def __init__(self, start):\n        self.n = start\n"
        "    def bump(self):\n        self.n += 1\n        return self.n\n"
        "    def die(self):\n        import os\n        os._exit(9)\n"
    )

    def call(method):
        return worker.execute(
            wire.method(cls, "Counter", method, instance_id="counter-1", ctor=((10,), {}))
        )

    assert wire.dec(call("bump")) == 11
    assert wire.dec(call("bump")) == 12
    died = call("die")
    assert "exited with status 9" in died.error
    assert "counter-1" in died.error and "lost" in died.error
    assert wire.dec(call("bump")) == 11  # rebuilt from its constructor arguments


def test_the_executor_is_started_on_first_use(wire):
    from flashrt_core import Runtime, Settings, load_settings

    async def scenario():
        runtime = Runtime(load_settings(Settings, {}, disable_plugin_autoload=True))
        try:
            return await runtime.execute(wire.function(PID, "pid"))
        finally:
            await runtime.shutdown()

    response = asyncio.run(scenario())
    assert response.success, response.error
    assert int(wire.dec(response)) != os.getpid()


def test_shutdown_leaves_no_executor_behind(executor, wire):
    worker = executor()
    pid = _pid(worker, wire)
    worker.close()
    worker.close = lambda: None  # closed here, not again at teardown
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


# --- output -------------------------------------------------------------------------------------


def test_output_is_echoed_live_as_written(executor, wire, capsys):
    worker = executor()
    code = "def talk():\n    print('one')\n    print('two', end='')\n    return 1\n"
    response = worker.execute(wire.function(code, "talk"))
    assert response.stdout == "one\ntwo"
    assert capsys.readouterr().out.splitlines() == ["one", "two"]


def test_the_echo_can_be_turned_off(executor, wire, capsys):
    worker = executor(echo=False)
    response = worker.execute(wire.function("def talk():\n    print('quiet')\n", "talk"))
    assert response.stdout == "quiet\n"
    assert "quiet" not in capsys.readouterr().out


def test_the_echo_is_bounded_and_says_so_once(executor, wire, capsys):
    worker = executor(echo_max_bytes=100)
    code = "def chatty():\n    for i in range(100):\n        print(f'line {i:03}')\n"
    response = worker.execute(wire.function(code, "chatty"))
    assert response.stdout.count("\n") == 100  # the response keeps its own bound
    captured = capsys.readouterr()
    assert captured.out.count("line ") < 20
    assert captured.err.count("live echo of request") == 1


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_hostile_output_never_breaks_a_response(make_worker, wire, isolation):
    worker = make_worker(isolation=isolation)
    surrogate = worker.execute(wire.function("def s():\n    print('\\ud800')\n    return 1\n", "s"))
    assert surrogate.success, surrogate.error
    json.loads(encode_response(surrogate))
    assert "replaced" in surrogate.stdout
    for code in (
        "import sys\nsys.stdout = None",
        "import sys\nsys.stdout.close()",
        "import sys, io\nsys.stdout = io.StringIO()",
        "import sys\nsys.stderr = None",
    ):
        body = "def hostile():\n" + textwrap.indent(code, "    ") + "\n    return 1\n"
        assert worker.execute(wire.function(body, "hostile")).success
        after = worker.execute(wire.function("def ok():\n    print('mine')\n    return 2\n", "ok"))
        assert after.stdout == "mine\n", code
    wrote_bytes = worker.execute(
        wire.function("def b():\n    import sys\n    sys.stdout.write(b'x')\n", "b")
    )
    assert wrote_bytes.success is False
    assert "must be str, not bytes" in wrote_bytes.error
    _alive(worker, wire)


# --- memory -------------------------------------------------------------------------------------

_CGROUP_V1 = Path("/sys/fs/cgroup/memory")

_WORKER_SCRIPT = """
import asyncio, json, os, sys
from flashrt_core import Runtime, Settings, load_settings

HOG = ("def hog():\\n    blocks = []\\n    while True:\\n"
       "        blocks.append(bytearray(64 << 20))\\n")
OK = "def ok():\\n    return 'still here'\\n"


async def main():
    runtime = Runtime(load_settings(Settings, {}, disable_plugin_autoload=True, isolation="process",
                                    retry_on_executor_death=False))
    await runtime.start()
    first = await runtime.execute({"function_name": "hog", "function_code": HOG,
                                   "serialization_format": "json"})
    second = await runtime.execute({"function_name": "ok", "function_code": OK,
                                    "serialization_format": "json"})
    await runtime.shutdown()
    print(json.dumps({"first": first.error, "second": second.json_result}))


asyncio.run(main())
"""


def test_a_memory_hog_under_a_cgroup_limit_fails_and_the_worker_survives(tmp_path):
    if not (_CGROUP_V1 / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = _CGROUP_V1 / f"flashrt-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    try:
        (group / "memory.limit_in_bytes").write_text(str(400 << 20))
        with (
            (group / "memory.memsw.limit_in_bytes").open("w")
            if (group / "memory.memsw.limit_in_bytes").exists()
            else open(os.devnull, "w") as swap
        ):
            swap.write(str(400 << 20))
        script = tmp_path / "worker.py"
        script.write_text(_WORKER_SCRIPT)
        # The worker joins the cgroup before Python starts: the executor it spawns inherits it.
        done = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" "$1"',
                sys.executable,
                script,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
        assert "killed by SIGKILL (out of memory?)" in outcome["first"]
        assert outcome["second"] == "still here"
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# --- hooks on both sides ------------------------------------------------------------------------


class _InstallsThenPersists:
    """Installs in the executor (it is cloudpickled there); persists in the worker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    @hookimpl
    def flashrt_resolve_deps(self, request, plan, context):
        import os as _os

        async def run() -> bool:
            print(f"installing in {_os.getpid()}")
            return True

        plan.claim("python", "test-installer", run)

    @hookimpl
    def flashrt_sync_cache(self, phase, context):
        if phase == "persist":
            Path(self.marker).write_text(str(os.getpid()))


def test_an_install_in_the_executor_persists_the_caches_from_the_worker(
    make_worker, wire, tmp_path
):
    marker = tmp_path / "persisted-by"
    worker = _executor(make_worker, extra_plugins=(_InstallsThenPersists(str(marker)),))
    request = wire.function(PID, "pid")
    request["dependencies"] = ["something-small"]
    response = worker.execute(request)
    assert response.success, response.error
    executor_pid = int(wire.dec(response))
    assert f"installing in {executor_pid}" in response.stdout
    for _ in range(100):  # persisting runs in the background; the text lands after the file
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.05)
    assert marker.read_text() == str(os.getpid())  # the worker's side, once
