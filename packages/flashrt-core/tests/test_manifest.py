"""Manifest reconciliation against a fake GraphQL State Manager on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from flashrt_core import Runtime, load_settings
from flashrt_core.builtin.manifest import (
    ManifestPlugin,
    ManifestReconciler,
    StateManagerError,
    fetch_manifest,
)
from flashrt_core.builtin.volume_settings import VolumeSettings
from flashrt_core.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

API_KEY = "rpa_test_key"
ENV_ID = "env-123"
BUILD_ID = "build-456"
OLD = {"version": "1.0", "resources": {"old": {}}}
NEW = {"version": "1.0", "resources": {"new": {}}, "resources_endpoints": {"new": "https://x"}}


class StateManager:
    """A GraphQL State Manager: ``mode`` is "ok", "500", "hang", "errors" or "no-build"."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.manifest_as_string = False
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"auth": self.headers.get("Authorization"), **body})
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if fake.mode == "hang":
                    fake.release.wait(20)
                if fake.mode == "500":
                    self.reply(500, {"error": "internal"})
                elif fake.mode == "errors":
                    self.reply(200, {"errors": [{"message": "environment not found"}]})
                elif "flashEnvironment(" in body["query"]:
                    build = None if fake.mode == "no-build" else BUILD_ID
                    env = {"id": body["variables"]["flashEnvironmentId"], "activeBuildId": build}
                    self.reply(200, {"data": {"flashEnvironment": env}})
                else:
                    assert body["variables"] == {"input": BUILD_ID}
                    manifest: Any = json.dumps(NEW) if fake.manifest_as_string else NEW
                    self.reply(
                        200, {"data": {"flashBuild": {"id": BUILD_ID, "manifest": manifest}}}
                    )

            def reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/graphql"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sm() -> Any:
    server = StateManager()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def manifest_file(tmp_path: Path) -> Path:
    """A local manifest written well over a TTL ago."""
    path = tmp_path / "app" / "flash_manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps(OLD))
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def reconciler(path: Path, sm: StateManager, **overrides: Any) -> ManifestReconciler:
    values: dict[str, Any] = {
        "state_manager_url": sm.url,
        "environment_id": ENV_ID,
        "manifest_ttl_s": 300.0,
        "manifest_wait_s": 2.0,
        "manifest_timeout_s": 5.0,
        "manifest_backoff_s": 0.3,
    }
    values.update(overrides)
    return ManifestReconciler.from_settings(path, VolumeSettings(**values), API_KEY)


def test_stale_manifest_is_refreshed_and_written_atomically(
    manifest_file: Path, sm: StateManager
) -> None:
    rec = reconciler(manifest_file, sm)
    assert asyncio.run(rec.get()) == NEW
    assert json.loads(manifest_file.read_text()) == NEW
    assert os.listdir(manifest_file.parent) == ["flash_manifest.json"], "no temp file left"
    first, second = sm.requests
    assert first["auth"] == f"Bearer {API_KEY}"
    assert "activeBuildId" in first["query"]
    assert first["variables"] == {"flashEnvironmentId": ENV_ID}
    assert "manifest" in second["query"] and second["variables"] == {"input": BUILD_ID}
    assert asyncio.run(rec.get()) == NEW
    assert len(sm.requests) == 2, "fresh within the TTL: not asked again"


def test_fresh_manifest_is_served_without_asking(manifest_file: Path, sm: StateManager) -> None:
    os.utime(manifest_file)
    assert asyncio.run(reconciler(manifest_file, sm).get()) == OLD
    assert sm.requests == []


def test_manifest_held_as_a_json_string_is_accepted(manifest_file: Path, sm: StateManager) -> None:
    sm.manifest_as_string = True
    assert reconciler(manifest_file, sm).get_blocking() == NEW


def test_500s_keep_the_manifest_and_back_off(manifest_file: Path, sm: StateManager) -> None:
    sm.mode = "500"
    rec = reconciler(manifest_file, sm, manifest_backoff_s=0.3)
    assert asyncio.run(rec.get()) == OLD
    assert "HTTP 500" in (rec.last_error or "")
    assert json.loads(manifest_file.read_text()) == OLD
    asked = len(sm.requests)
    for _ in range(5):
        assert asyncio.run(rec.get()) == OLD
    assert len(sm.requests) == asked, "a failing service is not hammered during the back-off"
    time.sleep(0.35)
    sm.mode = "ok"
    assert asyncio.run(rec.get()) == NEW
    assert rec.last_error is None


def test_hanging_service_never_blocks_past_the_bound(manifest_file: Path, sm: StateManager) -> None:
    sm.mode = "hang"
    rec = reconciler(manifest_file, sm, manifest_wait_s=0.2, manifest_timeout_s=10.0)

    async def many() -> tuple[list[Any], float]:
        started = time.monotonic()
        results = await asyncio.gather(*(rec.get() for _ in range(20)))
        return results, time.monotonic() - started

    results, elapsed = asyncio.run(many())
    assert results == [OLD] * 20
    assert elapsed < 0.2 + 0.5, f"callers waited {elapsed:.2f} s, bound 0.2 s"
    assert len(sm.requests) == 1, "single flight: one refresh for twenty callers"
    sm.mode = "ok"
    sm.release.set()
    deadline = time.monotonic() + 5
    while rec.refreshes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert asyncio.run(rec.get()) == NEW, "the slow refresh still lands"


def test_single_flight_with_a_slow_service(manifest_file: Path, sm: StateManager) -> None:
    sm.delay_s = 0.2
    rec = reconciler(manifest_file, sm)

    async def many() -> list[Any]:
        return await asyncio.gather(*(rec.get() for _ in range(10)))

    assert asyncio.run(many()) == [NEW] * 10
    assert len(sm.requests) == 2


def test_timeout_of_the_request_itself(manifest_file: Path, sm: StateManager) -> None:
    sm.mode = "hang"
    rec = reconciler(manifest_file, sm, manifest_timeout_s=0.3, manifest_wait_s=2.0)
    started = time.monotonic()
    assert rec.get_blocking() == OLD
    assert time.monotonic() - started < 2.0
    assert "unreachable" in (rec.last_error or "") or "timed out" in (rec.last_error or "")


@pytest.mark.parametrize(
    ("mode", "message"),
    [("errors", "GraphQL errors: environment not found"), ("no-build", "has no active build")],
)
def test_state_manager_errors_are_named(sm: StateManager, mode: str, message: str) -> None:
    sm.mode = mode
    with pytest.raises(StateManagerError, match=message):
        fetch_manifest(sm.url, API_KEY, ENV_ID, 5.0)


def test_unreachable_service(tmp_path: Path) -> None:
    with pytest.raises(StateManagerError, match="unreachable"):
        fetch_manifest("http://127.0.0.1:9/graphql", API_KEY, ENV_ID, 2.0)


def test_no_key_or_environment_means_no_refresh(manifest_file: Path, sm: StateManager) -> None:
    no_env = ManifestReconciler.from_settings(
        manifest_file, VolumeSettings(state_manager_url=sm.url), API_KEY
    )
    assert no_env.get_blocking() == OLD
    no_key = ManifestReconciler.from_settings(
        manifest_file, VolumeSettings(state_manager_url=sm.url, environment_id=ENV_ID), None
    )
    assert no_key.get_blocking() == OLD
    missing = ManifestReconciler.from_settings(
        manifest_file.parent / "missing.json", VolumeSettings(), None
    )
    assert missing.get_blocking() is None
    assert sm.requests == []


def test_unwritable_directory_keeps_the_refresh_in_memory(tmp_path: Path, sm: StateManager) -> None:
    path = tmp_path / "gone" / "flash_manifest.json"
    rec = reconciler(path, sm)
    assert rec.get_blocking() == NEW
    assert not path.exists()
    assert rec.get_blocking() == NEW
    assert len(sm.requests) == 2, "the in-memory copy counts as fresh"


def test_default_url_follows_the_flash_client() -> None:
    assert VolumeSettings().graphql_url == "https://api.runpod.io/graphql"
    env = {"RUNPOD_API_BASE_URL": "https://dev.runpod.example/"}
    assert load_settings(VolumeSettings, env).graphql_url == "https://dev.runpod.example/graphql"
    env["FLASHRT_STATE_MANAGER_URL"] = "http://127.0.0.1:1/graphql"
    assert load_settings(VolumeSettings, env).graphql_url == "http://127.0.0.1:1/graphql"


def test_reconcile_hook_through_the_runtime(manifest_file: Path, sm: StateManager) -> None:
    core = load_settings(
        Settings,
        {},
        disable_plugin_autoload=True,
        api_key=API_KEY,
        blocked_plugins=("flashrt.manifest",),
    )
    volume = VolumeSettings(state_manager_url=sm.url, environment_id=ENV_ID, manifest_wait_s=2.0)

    async def main() -> Any:
        runtime = Runtime(core, extra_plugins=(ManifestPlugin(volume),))
        pending = runtime.pm.hook.flashrt_reconcile_manifest(
            path=manifest_file, context=runtime.context
        )
        try:
            return await pending
        finally:
            await runtime.shutdown()

    assert asyncio.run(main()) == NEW
