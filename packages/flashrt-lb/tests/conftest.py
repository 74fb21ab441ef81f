"""Fixtures for flashrt-lb's own tests: isolated worker environments and real artifacts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
# The recorded client requests: the repository's copy, else the shared one beside the checkout.
FIXTURE_DIRS = (
    ROOT / "packages" / "flashrt-core" / "tests" / "fixtures",
    ROOT.parent / "shared" / "fixtures",
)


def _tar_gz(files: dict[str, str]) -> bytes:
    """A gzip'd tar whose members start with ``./``, as ``flash build`` writes them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tar_gz() -> Any:
    """``tar_gz({"name.py": source, ...}) -> bytes`` of a real artifact."""
    return _tar_gz


@pytest.fixture(scope="session")
def manifest() -> Any:
    """``manifest(resource, routes, is_live=...) -> str``: flash_manifest.json, one LB resource."""

    def build(resource: str, routes: dict[str, str], *, is_live: bool) -> str:
        functions = []
        for route, name in routes.items():
            method, path = route.split(" ", 1)
            functions.append(
                {
                    "name": name,
                    "module": resource,
                    "is_async": True,
                    "is_class": False,
                    "http_method": method,
                    "http_path": path,
                }
            )
        return json.dumps(
            {
                "version": "1.0",
                "project_name": "lbtest",
                "resources": {
                    resource: {
                        "resource_type": "LoadBalancerSlsResource",
                        "functions": functions,
                        "is_load_balanced": True,
                        "is_live_resource": is_live,
                    }
                },
                "function_registry": dict.fromkeys(routes.values(), resource),
                "routes": {resource: routes},
            }
        )

    return build


@pytest.fixture(scope="session")
def worker_env() -> Any:
    """``worker_env(tmp_dir, **extra) -> dict``: an environment that keeps the worker off the
    machine's real volume, cache and app directories."""

    def build(tmp: Path, **extra: str) -> dict[str, str]:
        env = {
            "FLASHRT_VOLUME_DIR": str(tmp / "volume"),
            "FLASHRT_CACHE_DIR": str(tmp / "cache"),
            "FLASHRT_DISABLE_VOLUME_CACHE": "1",
            "FLASHRT_APP_DIR": str(tmp / "app"),
            "FLASH_BUILD_ARTIFACT_PATH": str(tmp / "artifact.tar.gz"),
            "FLASHRT_ARTIFACT_BACKOFF_S": "0.1",
            "FLASHRT_ARTIFACT_MAX_BACKOFF_S": "0.3",
            "FLASHRT_ARTIFACT_WAIT_S": "30",
            "FLASHRT_LOG_LEVEL": "INFO",
        }
        env.update(extra)
        return env

    return build


@pytest.fixture(scope="session")
def fixture_08() -> dict[str, Any]:
    """The body the real client sent to ``/execute`` (add(4, 5, scale=2) -> 18)."""
    name = Path("client-requests") / "08_lb_execute.json"
    path = next((d / name for d in FIXTURE_DIRS if (d / name).is_file()), None)
    if path is None:
        pytest.fail(f"fixture {name} not found in {[str(d) for d in FIXTURE_DIRS]}")
    recorded = json.loads(path.read_text())
    body: dict[str, Any] = recorded[0]["body"]
    return body
