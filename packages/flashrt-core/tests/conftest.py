"""Shared helpers for the flashrt-core tests, exposed as fixtures.

Tests run the real Runtime on a private event loop (no pytest-asyncio): ``make_worker(...)``
builds a Runtime from explicit settings (the process environment is ignored, entry-point plugins
are off unless asked for) and closes it at teardown.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import pytest
from flashrt_core import FunctionResponse, Runtime, Settings, encode_response, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

#: The suite runs under each isolation: ``process`` by default, ``none`` in ``nox -s inprocess``.
ISOLATION = os.environ.get("FLASHRT_ISOLATION", "process")
FIXTURES = Path(__file__).parent / "fixtures" / "client-requests"

#: Entry-point plugins of the other workspace packages: tests that need autoload but are not
#: about installers keep them out, so they test only what they mean to.
OTHER_PLUGINS = ("python-installer", "system-installer")


class Worker:
    """A Runtime on its own event loop, driven synchronously from a test."""

    def __init__(self, runtime: Runtime) -> None:
        self.loop = asyncio.new_event_loop()
        self.rt = runtime
        self.run(self.rt.start())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def execute(self, request: Any) -> FunctionResponse:
        response = self.run(self.rt.execute(request))
        assert isinstance(response, FunctionResponse)
        return response

    def close(self) -> None:
        try:
            self.run(self.rt.shutdown())
        finally:
            self.loop.close()


def make_settings(*, autoload: bool = False, **overrides: Any) -> Settings:
    """Settings for a test: defaults plus ``overrides``; the process environment is ignored."""
    overrides.setdefault("timeout_s", 30.0)
    overrides.setdefault("isolation", ISOLATION)
    return load_settings(Settings, {}, disable_plugin_autoload=not autoload, **overrides)


@pytest.fixture
def make_worker() -> Iterator[Any]:
    """``make_worker(autoload=False, extra_plugins=(), prepare=None, **settings) -> Worker``;
    ``prepare(runtime)`` runs before it starts (what a shell sets up first)."""
    workers: list[Worker] = []

    def factory(
        *,
        autoload: bool = False,
        extra_plugins: tuple[object, ...] = (),
        prepare: Callable[[Runtime], None] | None = None,
        **overrides: Any,
    ) -> Worker:
        if autoload:
            overrides.setdefault("blocked_plugins", OTHER_PLUGINS)
        settings = make_settings(autoload=autoload, **overrides)
        runtime = Runtime(settings, extra_plugins=extra_plugins)
        if prepare is not None:
            prepare(runtime)
        worker = Worker(runtime)
        workers.append(worker)
        return worker

    yield factory
    for worker in workers:
        worker.close()


@pytest.fixture
def worker(make_worker: Any) -> Worker:
    """A Runtime with default settings and only the built-in plugins."""
    return make_worker()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def module_worker() -> Iterator[Worker]:
    """One default Runtime for a whole module, for modules whose tests only send requests and
    read the answers (no settings, plugins or executor state of their own): each Runtime costs
    an executor start, and such a module would pay one per test. A module opts in by
    overriding ``worker`` with it."""
    worker = Worker(Runtime(make_settings()))
    yield worker
    worker.close()


class Wire:
    """Build requests the way the client does and read responses the way it does."""

    @staticmethod
    def enc(value: Any) -> str:
        return base64.b64encode(cloudpickle.dumps(value)).decode("ascii")

    @staticmethod
    def dec(response: FunctionResponse) -> Any:
        assert response.success, response.error
        if response.result is None:
            return response.json_result
        return cloudpickle.loads(base64.b64decode(response.result))

    def function(self, code: str, name: str, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            "function_name": name,
            "function_code": code,
            "args": [self.enc(a) for a in args],
            "kwargs": {k: self.enc(v) for k, v in kwargs.items()},
        }

    def json_function(self, code: str, name: str, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            "function_name": name,
            "function_code": code,
            "args": list(args),
            "kwargs": kwargs,
            "serialization_format": "json",
        }

    def method(
        self,
        code: str,
        class_name: str,
        method: str,
        *args: Any,
        instance_id: str | None = None,
        ctor: tuple[tuple[Any, ...], dict[str, Any]] = ((), {}),
        create_new_instance: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return {
            "execution_type": "class",
            "class_name": class_name,
            "class_code": code,
            "method_name": method,
            "args": [self.enc(a) for a in args],
            "kwargs": {k: self.enc(v) for k, v in kwargs.items()},
            "constructor_args": [self.enc(a) for a in ctor[0]],
            "constructor_kwargs": {k: self.enc(v) for k, v in ctor[1].items()},
            "instance_id": instance_id,
            "create_new_instance": create_new_instance,
        }


@pytest.fixture(scope="session")
def wire() -> Wire:
    return Wire()


def load_fixture(name: str) -> list[dict[str, Any]]:
    """The recorded HTTP exchanges of ``fixtures/client-requests/<name>*.json``."""
    (path,) = FIXTURES.glob(f"{name}_*.json")
    data: list[dict[str, Any]] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="session")
def fixture_bodies() -> Any:
    """``fixture_bodies("01") -> [body, ...]``: the request bodies the real client sent."""

    def bodies(name: str) -> list[Any]:
        return [exchange["body"] for exchange in load_fixture(name)]

    return bodies


class Client:
    """The real runpod-flash client's side of a response (its own model and decoder)."""

    def __init__(self) -> None:
        from runpod_flash.protos import remote_execution
        from runpod_flash.stubs.live_serverless import LiveServerlessStub

        self.models = remote_execution
        self.stub = LiveServerlessStub(None)

    def decode(self, response: FunctionResponse) -> Any:
        """What the client's call returns: JSON on the wire, its model, its ``handle_response``."""
        output = json.loads(encode_response(response))
        return self.stub.handle_response(self.models.FunctionResponse(**output))


@pytest.fixture(scope="session")
def client() -> Client:
    return Client()
