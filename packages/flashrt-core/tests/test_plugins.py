"""The plugin system: entry points (a real installed distribution), blocking, tracing, errors."""

from __future__ import annotations

import asyncio
import os
import sys
import types
from pathlib import Path

import pytest
from flashrt_core import Runtime, Settings, StageError, hookimpl, load_settings
from flashrt_core.builtin import executors
from flashrt_core.plugins import (
    ENTRY_POINT_GROUP,
    FlashrtPluginManager,
    PluginError,
    describe_plugins,
    get_plugin_manager,
)

DOCS = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"
BUILTIN_ANSWER = "def plugin_echo(*args, **kwargs):\n    return 'built-in executor'\n"
PLAIN = "def plain(x):\n    return x * 2\n"
OTHERS = "python-installer,system-installer"


def _settings(environ: dict[str, str], **overrides) -> Settings:
    return load_settings(Settings, environ, **overrides)


def _execute_once(runtime: Runtime, request):
    async def scenario():
        try:
            return await runtime.execute(request)
        finally:
            await runtime.shutdown()

    return asyncio.run(scenario())


# --- the test plugin, installed as a real distribution ------------------------------------------


def test_test_plugin_is_loaded_from_its_entry_point():
    pm = get_plugin_manager(_settings({"FLASHRT_BLOCKED_PLUGINS": OTHERS}))
    plugin = pm.get_plugin("test-executor")
    assert plugin is not None and plugin.__name__ == "flashrt_test_plugin"
    rows = {row["name"]: row for row in describe_plugins(pm)}
    row = rows["test-executor"]
    assert row["origin"].startswith("entry point test-executor = flashrt_test_plugin")
    assert "flashrt-test-plugin 0.1.0" in row["origin"]
    assert row["hooks"] == ["flashrt_execute_function"]
    assert rows["flashrt.executors"]["origin"].startswith("built-in")
    assert {"flashrt_execute_class", "flashrt_execute_function"} <= set(
        rows["flashrt.executors"]["hooks"]
    )


def test_entry_point_plugin_wins_over_the_builtin_executor(make_worker, wire):
    worker = make_worker(autoload=True)
    response = worker.execute(wire.function(BUILTIN_ANSWER, "plugin_echo", 1, k="v"))
    assert wire.dec(response) == {
        "executor": "flashrt-test-plugin",
        "function": "plugin_echo",
        "args": [1],
        "kwargs": {"k": "v"},
    }
    # The plugin's awaitable ran inside the request's output capture.
    assert response.stdout == "flashrt-test-plugin ran plugin_echo\n"


def test_entry_point_plugin_declines_what_it_does_not_recognise(make_worker, wire):
    worker = make_worker(autoload=True)
    assert worker.rt.pm.get_plugin("test-executor") is not None
    assert wire.dec(worker.execute(wire.function(PLAIN, "plain", 21))) == 42


def test_disable_autoload_setting_keeps_entry_points_out(wire):
    settings = _settings({"FLASHRT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert settings.disable_plugin_autoload is True
    runtime = Runtime(settings)
    assert runtime.pm.get_plugin("test-executor") is None
    response = _execute_once(runtime, wire.function(BUILTIN_ANSWER, "plugin_echo"))
    assert wire.dec(response) == "built-in executor"


def test_blocked_plugin_is_not_loaded(wire):
    settings = _settings({"FLASHRT_BLOCKED_PLUGINS": f"test-executor, {OTHERS}"})
    assert "test-executor" in settings.blocked_plugins
    runtime = Runtime(settings)
    assert runtime.pm.get_plugin("test-executor") is None
    assert runtime.pm.is_blocked("test-executor")
    response = _execute_once(runtime, wire.function(BUILTIN_ANSWER, "plugin_echo"))
    assert wire.dec(response) == "built-in executor"


def test_blocking_the_builtin_executors_leaves_only_plugins(make_worker, wire):
    worker = make_worker(
        autoload=True,
        blocked_plugins=("flashrt.executors", "flashrt.deployed", *OTHERS.split(",")),
    )
    assert worker.rt.pm.get_plugin("flashrt.executors") is None
    assert wire.dec(worker.execute(wire.function(PLAIN, "plugin_x")))["executor"] == (
        "flashrt-test-plugin"
    )
    response = worker.execute(wire.function(PLAIN, "plain", 1))
    assert response.success is False
    assert "no executor accepted function 'plain'" in response.error


# --- who wins, whatever the order ---------------------------------------------------------------


class _Override:
    @hookimpl
    def flashrt_execute_function(self, request, call):
        async def run():
            return "override"

        return run()

    @hookimpl
    def flashrt_execute_class(self, request, call, instances):
        async def run():
            return "class override"

        return run()


def test_third_party_implementation_wins_regardless_of_registration_order(wire):
    from flashrt_core import hookspecs as specs

    pm = FlashrtPluginManager()
    pm.add_hookspecs(specs)
    pm.register(_Override(), name="early-third-party")
    pm.register(executors, name="flashrt.executors")  # registered last: pluggy would ask it first
    runtime = Runtime(_settings({}, disable_plugin_autoload=True), plugin_manager=pm)

    async def scenario():
        fn = await runtime.execute(wire.function(PLAIN, "plain", 1))
        method = await runtime.execute(wire.method("class A:\n    pass\n", "A", "m"))
        await runtime.shutdown()
        return fn, method

    fn, method = asyncio.run(scenario())
    assert wire.dec(fn) == "override"
    assert wire.dec(method) == "class override"


def test_extra_plugin_wins_over_builtin(make_worker, wire):
    worker = make_worker(extra_plugins=(_Override(),))
    assert wire.dec(worker.execute(wire.function(PLAIN, "plain", 1))) == "override"


class _Blamer:
    @hookimpl
    def flashrt_execute_function(self, request, call):
        async def run():
            print("looked for the model")
            raise StageError("load code", "model weights missing")

        return run()


def test_plugin_can_blame_another_stage_and_output_is_kept(make_worker, wire):
    response = make_worker(extra_plugins=(_Blamer(),)).execute(wire.function(PLAIN, "plain", 1))
    assert response.success is False
    assert response.error.startswith("model weights missing")
    assert "failed during load code" in response.error
    assert response.stdout == "looked for the model\n"


class _SlowPlugin:
    @hookimpl
    def flashrt_execute_function(self, request, call):
        return asyncio.sleep(30)


def test_runtime_applies_the_timeout_to_plugin_work(make_worker, wire):
    worker = make_worker(extra_plugins=(_SlowPlugin(),), timeout_s=0.2)
    response = worker.execute(wire.function(PLAIN, "plain", 1))
    assert "timed out after 0.2 s" in response.error


class _Installer:
    def __init__(self) -> None:
        self.ran: list[tuple[str, ...]] = []

    @hookimpl
    def flashrt_resolve_deps(self, request, plan, context):
        async def install() -> bool:
            print(f"installing {' '.join(plan.python)}")
            self.ran.append(plan.python)
            return False

        plan.claim("python", "test-installer", install)


class _BadResolver:
    @hookimpl
    def flashrt_resolve_deps(self, request, plan, context):
        raise ValueError(f"refusing {plan.python[0]!r}")


def test_installer_plugin_claims_python_and_unclaimed_kinds_are_reported(make_worker, wire):
    installer = _Installer()
    # The plugin object records its calls: it must run in this process to be read here.
    worker = make_worker(extra_plugins=(installer,), isolation="none")
    request = wire.function(PLAIN, "plain", 2)
    request["dependencies"] = ["numpy==2.0", "rich"]
    request["system_dependencies"] = ["libgl1"]
    response = worker.execute(request)
    assert wire.dec(response) == 4
    assert installer.ran == [("numpy==2.0", "rich")]
    assert "installing numpy==2.0 rich" in response.stdout
    assert "no installer plugin for system dependencies; not installed: libgl1" in response.stdout


def test_resolver_failure_is_a_dependencies_stage_error(make_worker, wire):
    worker = make_worker(extra_plugins=(_BadResolver(),))
    request = wire.function(PLAIN, "plain", 2)
    request["dependencies"] = ["--index-url=http://evil"]
    response = worker.execute(request)
    assert response.success is False
    assert "refusing '--index-url=http://evil'" in response.error
    assert "failed during dependencies" in response.error


# --- what a hook receives -------------------------------------------------------------------

#: The whole of a PluginContext (docs/plugins.md, "Objects hooks receive").
CONTEXT_API = {"artifact", "background", "pm", "run_blocking", "settings"}
RUNTIME_ONLY = ("execute", "start", "shutdown", "peek", "state", "ready", "supervisor", "lanes")


def _describe(context):
    """What a plugin sees of its ``context``, in plain data (it may travel from an executor)."""
    return {
        "type": f"{type(context).__module__}.{type(context).__qualname__}",
        "public": sorted(n for n in dir(context) if not n.startswith("_")),
        "runtime_only": [n for n in RUNTIME_ONLY if hasattr(context, n)],
    }


class _ContextRecorder:
    """Records the ``context`` of every hook; its executor hook answers with its own view."""

    def __init__(self) -> None:
        #: hook -> (the context's id, what the plugin sees of it); plain data, so the plugin
        #: can still be pickled for an executor after start-up.
        self.seen: dict[str, tuple[int, dict]] = {}

    def _saw(self, hook, context):
        self.seen[hook] = (id(context), _describe(context))

    @hookimpl
    def flashrt_startup(self, context):
        self._saw("startup", context)

    @hookimpl
    def flashrt_sync_cache(self, phase, context):
        self._saw(f"sync_cache:{phase}", context)

    @hookimpl
    def flashrt_request_started(self, request, context):
        self._saw("request_started", context)

    @hookimpl
    def flashrt_shutdown(self, context):
        self._saw("shutdown", context)

    @hookimpl
    def flashrt_resolve_deps(self, request, plan, context):
        async def run() -> bool:
            return False

        plan.claim("python", "context-recorder", run)
        self.deps_context = _describe(context)  # kept in the process that ran it

    @hookimpl
    def flashrt_execute_function(self, request, call, *_):
        if request.function_name != "show_context":
            return None
        return self._answer(call)

    async def _answer(self, call):
        view = _describe(call.context)
        view["same_as_deps"] = getattr(self, "deps_context", None) == view
        view["settings_isolation"] = call.context.settings.isolation
        view["blocking"] = await call.context.run_blocking(lambda: "ran in the pool")
        return view


def test_a_plugin_gets_the_context_and_nothing_else(wire):
    from flashrt_core.context import PluginContext

    recorder = _ContextRecorder()
    isolation = os.environ.get("FLASHRT_ISOLATION", "process")
    settings = _settings({}, disable_plugin_autoload=True, isolation=isolation)
    runtime = Runtime(settings, extra_plugins=(recorder,))
    request = wire.function("def show_context():\n    pass\n", "show_context")
    request["dependencies"] = ["anything"]
    response = _execute_once(runtime, request)  # start, the request, shutdown
    # Where user code runs (the executor, or here in-process): a context, never a Runtime.
    view = wire.dec(response)
    assert view["type"] == "flashrt_core.context.PluginContext", view
    assert set(view["public"]) == CONTEXT_API and view["runtime_only"] == []
    assert view["same_as_deps"], "resolve_deps and the executor hook see one kind of object"
    assert view["settings_isolation"] == "none"  # an executor's settings run code in place
    assert view["blocking"] == "ran in the pool"
    # Worker side: every lifecycle hook and observer got the Runtime's one context.
    assert set(recorder.seen) == {"startup", "sync_cache:hydrate", "request_started", "shutdown"}
    assert {seen[0] for seen in recorder.seen.values()} == {id(runtime.context)}
    assert all(seen[1] == recorder.seen["startup"][1] for seen in recorder.seen.values())
    context = runtime.context
    assert type(context) is PluginContext and not isinstance(context, Runtime)
    assert {n for n in dir(context) if not n.startswith("_")} == CONTEXT_API
    with pytest.raises(AttributeError):
        context.state = {}  # no scratch space: a plugin's state lives on the plugin


def test_a_hook_still_asking_for_runtime_fails_at_load_naming_it():
    class OldStyle:
        @hookimpl
        def flashrt_startup(self, runtime):
            return None

    settings = _settings({}, disable_plugin_autoload=True)
    with pytest.raises(PluginError, match="flashrt_startup") as info:
        get_plugin_manager(settings, extra_plugins=(OldStyle(),))
    assert "{'runtime'}" in str(info.value)
    assert "rename the argument" in str(info.value) and "'context'" in str(info.value)


# --- tracing and loud failures --------------------------------------------------------------


def test_trace_hooks_writes_hook_calls_to_stderr(wire, capsys):
    settings = _settings(
        {"FLASHRT_TRACE_HOOKS": "true"}, disable_plugin_autoload=True, isolation="none"
    )
    runtime = Runtime(settings)
    response = _execute_once(runtime, wire.function(PLAIN, "plain", 1))
    assert wire.dec(response) == 2
    err = capsys.readouterr().err
    assert "flashrt_configure" in err
    assert "flashrt_execute_function" in err
    # The trace goes to the worker's stderr, never into the request's output.
    assert "flashrt_execute_function" not in response.stdout


def _bad_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def flashrt_nonexistent(context):
        return None

    module.flashrt_nonexistent = flashrt_nonexistent
    return module


def test_unknown_hook_implementation_fails_at_startup_naming_the_plugin():
    module = _bad_module("my_misspelled_plugin")
    settings = _settings({}, disable_plugin_autoload=True)
    with pytest.raises(PluginError, match="my_misspelled_plugin") as info:
        Runtime(settings, extra_plugins=(module,))
    assert "unknown hook 'flashrt_nonexistent'" in str(info.value)


def test_hook_implementation_with_an_unknown_argument_fails_naming_it():
    class Wrong:
        @hookimpl
        def flashrt_execute_function(self, request, call, gpu):
            return None

    with pytest.raises(PluginError, match="gpu"):
        get_plugin_manager(_settings({}, disable_plugin_autoload=True), extra_plugins=(Wrong(),))


def _install_fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    dist = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def on_sys_path(tmp_path, monkeypatch):
    """``tmp_path`` on sys.path; modules imported from it are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("flashrt_fake_"):
            del sys.modules[name]


def test_broken_entry_point_gives_a_plugin_error_naming_it(on_sys_path):
    _install_fake_distribution(
        on_sys_path, "flashrt-broken-dist", {"broken-plugin": "flashrt_fake_missing_module"}
    )
    with pytest.raises(PluginError) as info:
        get_plugin_manager(_settings({"FLASHRT_BLOCKED_PLUGINS": OTHERS}))
    message = str(info.value)
    assert "'broken-plugin'" in message
    assert "flashrt-broken-dist 0.1" in message
    assert "flashrt_fake_missing_module" in message
    # Blocked by name, it is never imported and the worker starts.
    blocked = _settings({"FLASHRT_BLOCKED_PLUGINS": f"broken-plugin,{OTHERS}"})
    assert get_plugin_manager(blocked).get_plugin("test-executor") is not None


def test_entry_point_raising_on_import_names_the_error(on_sys_path):
    (on_sys_path / "flashrt_fake_raising.py").write_text("raise RuntimeError('no GPU here')\n")
    _install_fake_distribution(
        on_sys_path, "flashrt-raising-dist", {"raising": "flashrt_fake_raising"}
    )
    with pytest.raises(PluginError, match=r"'raising'.*RuntimeError: no GPU here"):
        get_plugin_manager(_settings({"FLASHRT_BLOCKED_PLUGINS": OTHERS}))


def test_entry_point_with_an_unknown_hook_fails_at_startup(on_sys_path):
    (on_sys_path / "flashrt_fake_unknown_hook.py").write_text(
        "from flashrt_core import hookimpl\n\n"
        "@hookimpl\n"
        "def flashrt_execute_functoin(request, call):\n"
        "    return None\n"
    )
    _install_fake_distribution(
        on_sys_path, "flashrt-typo-dist", {"typo": "flashrt_fake_unknown_hook"}
    )
    with pytest.raises(PluginError) as info:
        get_plugin_manager(_settings({"FLASHRT_BLOCKED_PLUGINS": OTHERS}))
    assert "flashrt_fake_unknown_hook" in str(info.value)
    assert "flashrt_execute_functoin" in str(info.value)


# --- documentation ------------------------------------------------------------------------------
