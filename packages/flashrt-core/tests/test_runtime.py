"""Runtime.execute end to end: function kinds, failures by stage, timeouts, BaseExceptions."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import pytest
from flashrt_core import FunctionRequest, FunctionResponse, Runtime, hookimpl
from flashrt_core.settings import Settings, load_settings


def _ok_after(worker, wire):
    """The worker still serves a plain request."""
    response = worker.execute(wire.function("def alive():\n    return 'alive'\n", "alive"))
    assert wire.dec(response) == "alive"


# --- kinds of functions --------------------------------------------------------------------------


def test_sync_function_runs_in_a_worker_thread_not_on_the_loop(worker, wire):
    code = (
        "def where():\n"
        "    import asyncio, threading\n"
        "    try:\n"
        "        asyncio.get_running_loop()\n"
        "        on_loop = True\n"
        "    except RuntimeError:\n"
        "        on_loop = False\n"
        "    return threading.current_thread().name, on_loop\n"
    )
    name, on_loop = wire.dec(worker.execute(wire.function(code, "where")))
    assert on_loop is False
    if worker.rt.isolated:
        # The executor's main thread, which is not where its event loop runs.
        assert name == "MainThread"
    else:
        assert name != threading.current_thread().name
        assert name.startswith("flashrt")


def test_async_function_is_awaited_on_the_loop(worker, wire):
    code = (
        "async def where(x):\n"
        "    import asyncio\n"
        "    await asyncio.sleep(0)\n"
        "    asyncio.get_running_loop()\n"
        "    return x + 1\n"
    )
    assert wire.dec(worker.execute(wire.function(code, "where", 41))) == 42


@pytest.mark.parametrize(
    "code",
    [
        "def gen(n):\n    for i in range(n):\n        yield i * i\n",
        "async def gen(n):\n    import asyncio\n    for i in range(n):\n"
        "        await asyncio.sleep(0)\n        yield i * i\n",
        "def gen(n):\n    return (i * i for i in range(n))\n",
    ],
    ids=["generator", "async-generator", "returns-generator"],
)
def test_generator_results_are_collected_into_a_list(worker, wire, code):
    assert wire.dec(worker.execute(wire.function(code, "gen", 4))) == [0, 1, 4, 9]


def test_sync_function_returning_a_coroutine_is_awaited(worker, wire):
    code = "def outer():\n    async def inner():\n        return 'awaited'\n    return inner()\n"
    assert wire.dec(worker.execute(wire.function(code, "outer"))) == "awaited"


def test_code_runs_with_a_proper_module_name_in_a_fresh_namespace(worker, wire):
    code = "counter = []\ndef f():\n    counter.append(1)\n    return __name__, len(counter)\n"
    first = wire.dec(worker.execute(wire.function(code, "f")))
    second = wire.dec(worker.execute(wire.function(code, "f")))
    # Same source twice: cached compile, but a fresh namespace each time.
    assert first == second
    assert first[1] == 1
    assert first[0] not in ("__main__", "builtins") and first[0].startswith("__")


def test_stacked_call_stub_imports_are_available(worker, wire):
    code = "def f():\n    import aiohttp, cloudpickle\n    return 'ok'\n"
    assert wire.dec(worker.execute(wire.function(code, "f"))) == "ok"


# --- failures and their stages ---------------------------------------------------------------


def test_function_not_found_lists_the_names_the_code_defines(worker, wire):
    code = "import os\ndef alpha():\n    pass\ndef beta():\n    pass\nclass Gamma:\n    pass\n"
    response = worker.execute(wire.function(code, "delta"))
    assert response.success is False
    assert "function 'delta' not found" in response.error
    assert "it defines: Gamma, alpha, beta" in response.error
    assert "failed during load code" in response.error


def test_code_that_does_not_compile_is_a_load_code_failure(worker, wire):
    response = worker.execute(wire.function("def f(:\n    pass\n", "f"))
    assert response.success is False
    assert "does not compile" in response.error
    assert "failed during load code" in response.error


def test_code_raising_at_module_level_is_a_load_code_failure_with_traceback(worker, wire):
    response = worker.execute(wire.function("print('loading')\nraise ImportError('nope')\n", "f"))
    assert response.success is False
    assert "raised ImportError: nope" in response.error
    assert "failed during load code" in response.error
    assert "Traceback" in response.error
    assert response.stdout == "loading\n"


def test_user_exception_reports_the_call_stage_with_the_users_traceback(worker, wire):
    code = "def f(x):\n    return helper(x)\ndef helper(x):\n    return 1 / x\n"
    response = worker.execute(wire.function(code, "f", 0))
    assert response.success is False
    assert response.error.startswith("division by zero")
    assert "failed during call (ZeroDivisionError)" in response.error
    assert "in helper" in response.error
    assert "return 1 / x" in response.error
    # The runtime's own plumbing is not part of the user's story.
    assert "flashrt_core" not in response.error


def test_failure_response_is_a_failure_for_the_client(worker, wire, client):
    response = worker.execute(wire.function("def f():\n    raise KeyError('k')\n", "f"))
    with pytest.raises(Exception, match=r"^Remote execution failed: 'k'"):
        client.decode(response)


# --- timeouts ------------------------------------------------------------------------------------


def test_sync_timeout_from_the_request_field(worker, wire):
    request = wire.function("def slow():\n    import time\n    time.sleep(1.0)\n", "slow")
    request["timeout_s"] = 0.2
    response = worker.execute(request)
    assert response.success is False
    assert "timed out after 0.2 s" in response.error
    _ok_after(worker, wire)


def test_async_timeout_cancels_the_coroutine(make_worker, wire, tmp_path):
    worker = make_worker(timeout_s=0.3)
    marker = tmp_path / "cancelled"
    code = (
        "async def slow(path):\n"
        "    import asyncio\n"
        "    try:\n"
        "        await asyncio.sleep(30)\n"
        "    except asyncio.CancelledError:\n"
        "        open(path, 'w').write('cancelled')\n"
        "        raise\n"
    )
    response = worker.execute(wire.function(code, "slow", str(marker)))
    assert response.success is False
    assert "timed out after 0.3 s" in response.error
    # In an executor process the cancellation lands just after the answer; the file exists a
    # moment before its text is written, so wait for the text.
    for _ in range(100):
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.05)
    assert marker.read_text() == "cancelled"
    _ok_after(worker, wire)


def test_request_timeout_is_capped_by_the_worker_maximum(make_worker, wire):
    worker = make_worker(max_timeout_s=0.2)
    request = wire.function(
        "async def slow():\n    import asyncio\n    await asyncio.sleep(30)\n", "slow"
    )
    request["timeout_s"] = 100
    response = worker.execute(request)
    assert "timed out after 0.2 s" in response.error


def _limits_from(environ):
    """The two time-limit settings as the worker reads them from ``environ``."""
    settings = load_settings(Settings, environ)
    return {"timeout_s": settings.timeout_s, "max_timeout_s": settings.max_timeout_s}


def test_no_time_limit_of_our_own_by_default():
    settings = load_settings(Settings, {})
    assert settings.timeout_s is None
    assert settings.max_timeout_s is None
    assert settings.time_limit() is None
    assert settings.time_limit(5) == 5.0  # a request's own limit is taken as given
    # Set to 0 or to nothing, the variables mean the same: no limit.
    zero = load_settings(Settings, {"FLASHRT_TIMEOUT_S": "0", "FLASHRT_MAX_TIMEOUT_S": ""})
    assert zero.time_limit() is None
    assert zero.time_limit(5) == 5.0
    # An infinite limit is none; not a deadline at infinity.
    assert load_settings(Settings, {"FLASHRT_TIMEOUT_S": "inf"}).time_limit() is None
    assert settings.time_limit(float("inf")) is None


SLEEP_CODE = "def nap(s):\n    import time\n    time.sleep(s)\n    return 'rested'\n"


def test_a_small_max_timeout_alone_does_not_limit_a_request(make_worker, wire):
    # The cap bounds a request's own timeout_s; with no FLASHRT_TIMEOUT_S nothing limits this
    # request, so a cap of 1 s that would have stopped it does not.
    worker = make_worker(**_limits_from({"FLASHRT_MAX_TIMEOUT_S": "1"}))
    response = worker.execute(wire.function(SLEEP_CODE, "nap", 1.5))
    assert response.success is True, response.error
    assert wire.dec(response) == "rested"


def test_the_operator_limit_applies_and_the_cap_does_not_lower_it(make_worker, wire):
    worker = make_worker(**_limits_from({"FLASHRT_TIMEOUT_S": "1", "FLASHRT_MAX_TIMEOUT_S": "0.5"}))
    started = time.monotonic()
    response = worker.execute(wire.function(SLEEP_CODE, "nap", 3))
    assert response.success is False
    assert "timed out after 1 s" in response.error
    assert time.monotonic() - started < 2.5
    _ok_after(worker, wire)


def test_a_request_field_above_the_cap_is_capped(make_worker, wire):
    worker = make_worker(**_limits_from({"FLASHRT_MAX_TIMEOUT_S": "0.5"}))
    request = wire.function(
        "async def slow():\n    import asyncio\n    await asyncio.sleep(30)\n", "slow"
    )
    request["timeout_s"] = 100
    response = worker.execute(request)
    assert response.success is False
    assert "timed out after 0.5 s" in response.error


# --- BaseExceptions from user code ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("def f():\n    raise SystemExit(3)\n", "SystemExit: 3"),
        ("def f():\n    raise KeyboardInterrupt('stop')\n", "KeyboardInterrupt: stop"),
        ("async def f():\n    raise SystemExit(4)\n", "SystemExit: 4"),
        ("async def f():\n    raise KeyboardInterrupt\n", "KeyboardInterrupt"),
        ("def f():\n    import sys\n    sys.exit('bye')\n", "SystemExit: bye"),
        ("def f():\n    raise GeneratorExit\n", "GeneratorExit"),
        ("def f():\n    yield 1\n    raise SystemExit(5)\n", "SystemExit: 5"),
    ],
    ids=[
        "sync-exit",
        "sync-interrupt",
        "async-exit",
        "async-interrupt",
        "sys.exit",
        "genexit",
        "gen",
    ],
)
def test_base_exceptions_become_error_responses(worker, wire, code, expected):
    response = worker.execute(wire.function(code, "f"))
    assert response.success is False
    assert response.error.startswith(expected)
    assert "failed during call" in response.error
    _ok_after(worker, wire)


def test_system_exit_while_loading_code_is_a_failure(worker, wire):
    response = worker.execute(wire.function("raise SystemExit(9)\n", "f"))
    assert response.success is False
    assert "SystemExit" in response.error
    _ok_after(worker, wire)


def test_system_exit_in_a_constructor_is_a_failure(worker, wire):
    code = (
        "class A:\n"
        "    def __init__(self):\n"
        "        raise SystemExit(2)\n"
        "    def m(self):\n"
        "        pass\n"
    )
    response = worker.execute(wire.method(code, "A", "m", instance_id="A_1"))
    assert response.success is False
    assert "SystemExit" in response.error
    _ok_after(worker, wire)


# --- the Runtime object -------------------------------------------------------------------------


def test_execute_accepts_a_request_object(worker, wire):
    request = FunctionRequest(
        function_name="f", function_code="def f(a):\n    return a * 2\n", args=[wire.enc(21)]
    )
    assert wire.dec(worker.execute(request)) == 42


def test_start_is_idempotent_and_marks_ready(worker):
    assert worker.rt.ready is True
    assert worker.rt.startup_error is None
    worker.run(worker.rt.start())
    assert worker.rt.ready is True


class _Lifecycle:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.events: list[str] = []

    @hookimpl
    def flashrt_startup(self, context):
        async def go():
            self.events.append("startup")
            if self.fail:
                raise RuntimeError("artifact missing")

        return go()

    @hookimpl
    def flashrt_sync_cache(self, phase, context):
        self.events.append(f"cache:{phase}")

    @hookimpl
    def flashrt_request_started(self, request, context):
        self.events.append(f"started:{request.function_name}")
        raise RuntimeError("observers must not break requests")

    @hookimpl
    def flashrt_request_finished(self, request, response, context):
        self.events.append(f"finished:{response.success}")

    @hookimpl
    def flashrt_shutdown(self, context):
        async def go():
            self.events.append("shutdown")

        return go()


def test_lifecycle_hooks_run_in_order_and_observers_cannot_break_requests(make_worker, wire):
    plugin = _Lifecycle()
    worker = make_worker(extra_plugins=(plugin,))
    assert wire.dec(worker.execute(wire.function("def f():\n    return 1\n", "f"))) == 1
    worker.run(worker.rt.shutdown())
    assert plugin.events == [
        "startup",
        "cache:hydrate",
        "started:f",
        "finished:True",
        "shutdown",
    ]


def test_failed_startup_is_reported_not_raised(wire):
    plugin = _Lifecycle(fail=True)
    from flashrt_core import Settings, load_settings

    runtime = Runtime(
        load_settings(Settings, {}, disable_plugin_autoload=True), extra_plugins=(plugin,)
    )

    async def scenario():
        await runtime.start()
        await runtime.shutdown()

    asyncio.run(scenario())
    assert runtime.ready is False
    assert runtime.startup_error == "start-up failed: RuntimeError: artifact missing"


def test_background_failures_are_logged_and_run_blocking_works(worker, caplog):
    async def scenario():
        async def boom():
            raise ValueError("background went wrong")

        task = worker.rt.background(boom())
        await asyncio.wait([task])
        return await worker.rt.run_blocking(lambda a, b=0: threading.current_thread().name + a, "!")

    with caplog.at_level(logging.ERROR, logger="flashrt.runtime"):
        name = worker.run(scenario())
    assert name.startswith("flashrt") and name.endswith("!")
    assert "background task failed" in caplog.text
    assert "background went wrong" in caplog.text


def test_never_raises_even_for_nonsense(worker):
    for nonsense in (None, 3.5, object(), {"input": None}, b"\x00" * 10):
        response = worker.execute(nonsense)
        assert isinstance(response, FunctionResponse)
        assert response.success is False


def test_stdout_is_the_original_stream_after_every_request(worker, wire):
    out, err = sys.stdout, sys.stderr
    worker.execute(wire.function("def f():\n    print('x')\n    raise ValueError\n", "f"))
    worker.execute(wire.function("def f():\n    print('y')\n", "f"))
    worker.execute(b"garbage")
    assert sys.stdout is out
    assert sys.stderr is err


def test_a_task_spawned_by_user_code_raising_systemexit_does_not_stop_the_worker(worker) -> None:
    code = (
        "async def spawn():\n"
        "    import asyncio\n"
        "    async def bad():\n"
        "        raise SystemExit(3)\n"
        "    asyncio.create_task(bad())\n"
        "    await asyncio.sleep(0.05)\n"
        "    return 'survived'\n"
    )
    body = {"function_name": "spawn", "function_code": code, "serialization_format": "json"}
    first = worker.execute(body)
    assert first.success, first.error
    assert first.json_result == "survived"
    again = worker.execute(body)
    assert again.json_result == "survived"


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_timeout_is_rejected_at_decode(worker, bad: float) -> None:
    response = worker.execute(
        {"function_name": "f", "function_code": "def f():\n    return 1\n", "timeout_s": bad}
    )
    assert not response.success
    assert "timeout_s must be a positive number" in response.error
    assert "failed during decode" in response.error


class _RecordingInstaller:
    """Claims Python dependencies and records whether its step ever ran."""

    def __init__(self) -> None:
        self.ran = False

    @hookimpl
    def flashrt_resolve_deps(self, request, plan, context):
        async def run() -> bool:
            self.ran = True
            return True

        plan.claim("python", "recording", run)


@pytest.mark.parametrize(
    "bad",
    [{"modules": {"../evil.py": "x = 1"}}, {"serialization_format": "xml"}],
    ids=["module path", "format"],
)
def test_invalid_request_parts_fail_before_any_install(make_worker, bad) -> None:
    installer = _RecordingInstaller()
    worker = make_worker(extra_plugins=(installer,))
    body = {
        "function_name": "f",
        "function_code": "def f():\n    return 1\n",
        "dependencies": ["some-package"],
        **bad,
    }
    response = worker.execute(body)
    assert not response.success
    assert "failed during decode" in response.error
    assert installer.ran is False


def test_compiled_code_and_its_source_lines_stay_bounded(worker) -> None:
    import linecache

    from flashrt_core import invocation

    before = {k for k in linecache.cache if k.startswith("<remote ")}
    for i in range(invocation._CODE_CACHE_SIZE + 20):
        code = f"def f():\n    return {i}\n"
        response = worker.execute(
            {"function_name": "f", "function_code": code, "serialization_format": "json"}
        )
        assert response.json_result == i
    remote = {k for k in linecache.cache if k.startswith("<remote ")} - before
    assert len(invocation._code_cache) <= invocation._CODE_CACHE_SIZE
    assert len(remote) <= invocation._CODE_CACHE_SIZE
