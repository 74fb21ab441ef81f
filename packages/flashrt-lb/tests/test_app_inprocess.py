"""The app in-process (httpx's ASGI transport over a real Runtime): the cases that need no socket.

The subprocess modules cover the platform-facing behaviour; these pin down start-up decisions
(is /execute on? what does a failing app lifespan report?) quickly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from flashrt_core import PluginContext, hookimpl
from flashrt_core.runtime import Runtime
from flashrt_core.settings import Settings, SettingsError, load_settings
from flashrt_lb.app import Worker, create_app, create_served_app
from flashrt_lb.settings import LBSettings

if TYPE_CHECKING:
    from pathlib import Path


def _settings(**overrides: Any) -> Settings:
    return Settings(disable_plugin_autoload=True, **overrides)


async def _started(worker: Worker, app: Any = None) -> httpx.AsyncClient:
    """A client of ``app``; by default the served one (``/execute`` before FastAPI's stack)."""
    await worker.wait_started()
    app = app or create_served_app(worker)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker")


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``app_dir(files)``: an already-unpacked app (``FLASH_DISABLE_UNPACK``) in a temp dir."""

    def write(files: dict[str, str]) -> None:
        for name, text in files.items():
            (tmp_path / name).write_text(textwrap.dedent(text))
        monkeypatch.setenv("FLASHRT_APP_DIR", str(tmp_path))

    return write


def test_lb_settings_come_from_the_environment() -> None:
    lb = load_settings(
        LBSettings,
        {
            "PORT": "8080",
            "PORT_HEALTH": "8081",
            "FLASHRT_LB_EXECUTE": "false",
            "FLASHRT_LB_TOKEN": "t",
        },
    )
    assert (lb.port, lb.port_health, lb.execute, lb.token) == (8080, 8081, False, "t")
    defaults = load_settings(LBSettings, {})
    assert (defaults.port, defaults.port_health, defaults.host) == (80, None, "0.0.0.0")
    assert defaults.execute is None and defaults.token is None
    with pytest.raises(SettingsError, match="PORT"):
        load_settings(LBSettings, {"PORT": "eighty"})


def test_live_mode_can_switch_execute_off() -> None:
    async def scenario() -> tuple[int, int]:
        worker = Worker(_settings(), LBSettings(execute=False))
        async with await _started(worker) as client:
            ping = await client.get("/ping")
            execute = await client.post("/execute", json={"function_name": "f"})
        await worker.stop()
        return ping.status_code, execute.status_code

    assert asyncio.run(scenario()) == (200, 404)


class _StartUp:
    """A start-up hook that waits to be released, or fails with ``error``."""

    def __init__(self, error: str | None = None) -> None:
        self.release = asyncio.Event()
        self.error = error

    @hookimpl
    def flashrt_startup(self, context: PluginContext) -> Any:
        async def start() -> None:
            if self.error:
                raise RuntimeError(self.error)
            await self.release.wait()

        return start()


def test_ping_is_204_while_starting_then_200_once_ready() -> None:
    plugin = _StartUp()

    async def scenario() -> list[tuple[int, bytes]]:
        settings = _settings()
        worker = Worker(settings, runtime=Runtime(settings, extra_plugins=(plugin,)))
        worker.begin()
        app = create_served_app(worker)
        transport = httpx.ASGITransport(app=app)
        answers = []
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            ping = await client.get("/ping")
            answers.append((ping.status_code, ping.content))
            plugin.release.set()
            await worker.wait_started()
            ping = await client.get("/ping")
            answers.append((ping.status_code, ping.content))
        await worker.stop()
        return answers

    assert asyncio.run(scenario()) == [(204, b""), (200, b'{"status":"ready"}')]


def test_a_failed_start_up_is_a_503_naming_the_reason_on_ping_and_execute() -> None:
    plugin = _StartUp(error="no GPU is visible")

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        settings = _settings()
        worker = Worker(settings, runtime=Runtime(settings, extra_plugins=(plugin,)))
        async with await _started(worker) as client:
            ping = await client.get("/ping")
            execute = await client.post("/execute", json={"function_name": "f"})
        await worker.stop()
        return ping, execute

    ping, execute = asyncio.run(scenario())
    reason = "start-up failed: RuntimeError: no GPU is visible"
    assert (ping.status_code, ping.json()) == (503, {"status": "failed", "reason": reason})
    assert execute.status_code == 503
    assert execute.json() == {"error": "worker start-up failed", "reason": reason}


def test_the_served_app_answers_execute_as_the_fastapi_app_does() -> None:
    """The served app takes ``POST /execute`` before FastAPI's middleware and routing: every
    answer (and its headers) stays the same, and what is not that route still reaches FastAPI."""
    ok = {
        "function_name": "f",
        "function_code": "def f():\n    return 42\n",
        "serialization_format": "json",
    }
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/execute", {"json": ok}),
        ("POST", "/execute", {"json": ok, "headers": {"authorization": "Bearer nope"}}),
        ("POST", "/execute", {"json": ok, "headers": {"Authorization": "bearer  s3cret "}}),
        ("POST", "/execute", {"json": ok, "headers": {"authorization": "Basic s3cret"}}),
        (
            "POST",
            "/execute",
            {"content": b"{not json", "headers": {"authorization": "Bearer s3cret"}},
        ),
        (
            "POST",
            "/execute",
            {"content": b"x" * 5000, "headers": {"authorization": "Bearer s3cret"}},
        ),
        ("GET", "/execute", {}),
        ("POST", "/execute/", {}),
        ("GET", "/elsewhere", {}),
    ]

    async def answers(served: bool) -> list[tuple[int, bytes, str | None, str | None]]:
        lb = LBSettings(token="s3cret", max_body_bytes=4096)
        worker = Worker(_settings(isolation="none"), lb)
        app = create_served_app(worker) if served else create_app(worker=worker)
        got = []
        async with await _started(worker, app) as client:
            for method, path, kwargs in cases:
                answer = await client.request(method, path, **kwargs)
                got.append(
                    (
                        answer.status_code,
                        answer.content,
                        answer.headers.get("content-type"),
                        answer.headers.get("www-authenticate"),
                    )
                )
        await worker.stop()
        return got

    served, fastapi = asyncio.run(answers(True)), asyncio.run(answers(False))
    assert served == fastapi
    assert [status for status, *_ in served] == [401, 401, 200, 401, 400, 413, 405, 307, 404]
    assert json.loads(served[2][1])["json_result"] == 42


def test_deployed_execute_follows_the_manifest(app_dir: Any) -> None:
    app_dir(
        {
            "handler_inproc_live.py": """
                from fastapi import FastAPI
                app = FastAPI()
            """,
            "flash_manifest.json": '{"resources": {"inproc_live": {"is_live_resource": true}}}',
        },
    )

    async def scenario() -> Any:
        worker = Worker(_settings(resource_name="inproc_live", disable_unpack=True))
        async with await _started(worker) as client:
            body = {
                "function_name": "f",
                "function_code": "def f():\n    return 7\n",
                "serialization_format": "json",
            }
            answer = (await client.post("/execute", json=body)).json()
        await worker.stop()
        return worker.execute_enabled, answer

    enabled, answer = asyncio.run(scenario())
    assert enabled is True
    assert answer["success"] is True and answer["json_result"] == 7


def test_an_app_whose_lifespan_fails_makes_start_up_fail_with_its_message(app_dir: Any) -> None:
    app_dir(
        {
            "handler_inproc_failing.py": """
                import contextlib
                from fastapi import FastAPI

                @contextlib.asynccontextmanager
                async def lifespan(app):
                    raise RuntimeError("the model file is missing")
                    yield

                app = FastAPI(lifespan=lifespan)
            """
        },
    )

    async def scenario() -> tuple[int, dict[str, Any]]:
        worker = Worker(_settings(resource_name="inproc_failing", disable_unpack=True))
        async with await _started(worker) as client:
            ping = await client.get("/ping")
        await worker.stop()
        return ping.status_code, ping.json()

    status, body = asyncio.run(scenario())
    assert status == 503
    assert body["status"] == "failed"
    assert "the model file is missing" in body["reason"]


def test_a_plain_asgi_app_without_lifespan_support_is_served(app_dir: Any) -> None:
    app_dir(
        {
            "plain_asgi.py": """
                async def application(scope, receive, send):
                    if scope["type"] != "http":
                        raise RuntimeError("lifespan is not supported")
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": scope["path"].encode()})
            """
        },
    )

    async def scenario() -> tuple[int, str, int]:
        worker = Worker(
            _settings(disable_unpack=True),
            LBSettings(is_mothership=True, main_file="plain_asgi.py", app_variable="application"),
        )
        async with await _started(worker) as client:
            ping = await client.get("/ping")
            answer = await client.get("/any/path")
            execute = await client.post("/execute", json={})
        await worker.stop()
        return ping.status_code, answer.text, execute.status_code

    # Legacy apps get no /execute unless FLASHRT_LB_EXECUTE turns it on.
    assert asyncio.run(scenario()) == (200, "/any/path", 404)


def test_a_missing_app_variable_is_named(app_dir: Any) -> None:
    app_dir({"handler_inproc_noapp.py": "def handler(job):\n    return 1\n"})

    async def scenario() -> dict[str, Any]:
        worker = Worker(_settings(resource_name="inproc_noapp", disable_unpack=True))
        async with await _started(worker) as client:
            body: dict[str, Any] = (await client.get("/ping")).json()
        await worker.stop()
        return body

    reason = asyncio.run(scenario())["reason"]
    assert "handler_inproc_noapp.py defines no 'app'" in reason


class _CountingDecoder:
    """Stands in front of the protocol's JSON decoder of whole requests and counts its uses."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def decode(self, data: Any) -> Any:
        self.calls += 1
        return self.real.decode(data)


class _Observer:
    """A worker-side observer: its presence is the one reason to decode a request fully."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    @hookimpl
    def flashrt_request_started(self, request: Any, context: Any) -> None:
        self.seen.append(request.function_name)


def _count_full_decodes(monkeypatch: pytest.MonkeyPatch, *plugins: object) -> tuple[int, Any]:
    from flashrt_core import protocol

    counter = _CountingDecoder(protocol._json_decoder)
    monkeypatch.setattr(protocol, "_json_decoder", counter)
    calls: list[int] = []
    real_decode_request = protocol.decode_request

    def counted(data: Any) -> Any:
        calls.append(1)
        return real_decode_request(data)

    monkeypatch.setattr(protocol, "decode_request", counted)
    body = {
        "function_name": "f",
        "function_code": "def f(x):\n    return x * 2\n",
        "args": [21],
        "serialization_format": "json",
    }

    async def scenario() -> Any:
        from flashrt_core.runtime import Runtime

        settings = _settings(isolation="process")
        worker = Worker(settings, runtime=Runtime(settings, extra_plugins=plugins))
        async with await _started(worker) as client:
            counter.calls = 0
            calls.clear()
            answer = (await client.post("/execute", json=body)).json()
            bad = await client.post("/execute", content=b'{"function_name": "f", "args": "x"}')
        await worker.stop()
        return answer, bad.status_code

    answer, bad_status = asyncio.run(scenario())
    assert answer["success"] is True and answer["json_result"] == 42
    assert bad_status == 422  # the shape check still refuses a wrong field type itself
    return counter.calls + len(calls), answer


def test_the_worker_process_never_decodes_a_request_fully(monkeypatch: pytest.MonkeyPatch) -> None:
    # The executor (another process) decodes it, once; here only its shape is checked.
    decodes, _ = _count_full_decodes(monkeypatch)
    assert decodes == 0


def test_an_observer_costs_the_worker_exactly_one_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    observer = _Observer()
    decodes, _ = _count_full_decodes(monkeypatch, observer)
    assert observer.seen == ["f"]
    # decode_request, then the decoder inside it: one full decode of the one valid body.
    assert decodes == 2


# A process of its own per case: OpenTelemetry's global tracer provider can be set only once.
_SPANS = textwrap.dedent(
    """
    import asyncio, sys

    import httpx
    from flashrt_core.settings import Settings, load_settings
    from flashrt_lb.app import Worker, create_served_app
    from flashrt_lb.settings import LBSettings
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    lb = load_settings(LBSettings, {"FLASHRT_LB_TELEMETRY": sys.argv[1]})
    worker = Worker(Settings(disable_plugin_autoload=True, isolation="none"), lb)
    app = create_served_app(worker)
    body = {
        "function_name": "f",
        "function_code": "def f():\\n    return 1\\n",
        "serialization_format": "json",
    }

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            await worker.wait_started()
            for _ in range(3):
                assert (await client.get("/ping")).status_code == 200
                assert (await client.post("/execute", json=body)).json()["json_result"] == 1
        await worker.stop()

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    print(sum("/ping" in s.name for s in spans), sum("/execute" in s.name for s in spans))
    """
)


@pytest.mark.parametrize(("setting", "traced"), [("false", False), ("true", True)])
def test_fastapi_telemetry_of_the_worker_routes_follows_the_setting(
    setting: str, traced: bool, tmp_path: Path
) -> None:
    """Off by default, where an OpenTelemetry provider is configured or not: FastAPI would
    otherwise look three providers up on every request."""
    import fastapi

    if "telemetry" not in inspect.signature(fastapi.FastAPI).parameters:
        pytest.skip("this FastAPI has no telemetry of its own")
    pytest.importorskip("opentelemetry.sdk.trace", reason="the OpenTelemetry SDK records spans")
    script = tmp_path / "spans.py"
    script.write_text(_SPANS)
    env = {k: v for k, v in os.environ.items() if k != "FASTAPI_OTEL_AUTO_CONFIGURE"}
    done = subprocess.run(
        [sys.executable, str(script), setting],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    ping, execute = (int(n) for n in done.stdout.split()[-2:])
    assert (ping > 0, execute > 0) == (traced, traced), done.stdout
