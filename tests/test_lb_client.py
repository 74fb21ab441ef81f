"""The real runpod-flash client's LB stub against a real flashrt-lb process, plus load and auth.

Two live workers (open, and with a bearer token) start together and serve the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import cloudpickle
import httpx
import pytest
from flashrt_lb.testing import WorkerProcess

pytestmark = pytest.mark.slow  # real uvicorn subprocesses

if TYPE_CHECKING:
    from collections.abc import Iterator

os.environ.setdefault("RUNPOD_FLASH_SILENCE_DEPRECATION", "1")

TOKEN = "lb-test-token-3f9c"
ROOT = Path(__file__).resolve().parents[1]
FIXTURE_08 = Path("client-requests") / "08_lb_execute.json"


def add(a, b, scale=1):
    print(f"adding {a} + {b}")
    return (a + b) * scale


def _fixture_08() -> dict[str, Any]:
    for base in (ROOT / "packages/flashrt-core/tests/fixtures", ROOT.parent / "shared/fixtures"):
        if (base / FIXTURE_08).is_file():
            body: dict[str, Any] = json.loads((base / FIXTURE_08).read_text())[0]["body"]
            return body
    pytest.fail(f"fixture {FIXTURE_08} not found")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "FLASHRT_VOLUME_DIR": str(tmp / "volume"),
        "FLASHRT_CACHE_DIR": str(tmp / "cache"),
        "FLASHRT_DISABLE_VOLUME_CACHE": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    tmp = tmp_path_factory.mktemp("lb-client")
    started = {
        "open": WorkerProcess(_env(tmp)),
        "token": WorkerProcess(_env(tmp, FLASHRT_LB_TOKEN=TOKEN)),
    }
    try:
        for worker in started.values():
            worker.start()
        # The client's import is slow: pay it while the workers start.
        import runpod_flash.stubs.load_balancer_sls  # noqa: F401

        for worker in started.values():
            assert worker.wait_ready(timeout=60)[0] == 200, worker.output()
        yield started
    finally:
        for worker in started.values():
            worker.cleanup()


def _stub(base_url: str) -> Any:
    from runpod_flash.stubs.load_balancer_sls import LoadBalancerSlsStub

    return LoadBalancerSlsStub(SimpleNamespace(endpoint_url=base_url, name="flashrt-lb-test"))


def test_the_real_client_stub_gets_18_for_fixture_08(
    workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    stub = _stub(workers["open"].base_url)
    # What the stub sends is what the client recorded in fixture 08.
    sent = asyncio.run(stub._prepare_request(add, None, None, True, 4, 5, scale=2))
    recorded = _fixture_08()
    for key in ("function_name", "function_code", "dependencies", "system_dependencies"):
        assert sent[key] == recorded[key], key
    assert asyncio.run(stub(add, None, None, True, 4, 5, scale=2)) == 18


def test_the_recorded_fixture_08_body_gives_18(workers: dict[str, WorkerProcess]) -> None:
    from runpod_flash.stubs.load_balancer_sls import LoadBalancerSlsStub

    response = httpx.post(f"{workers['open'].base_url}/execute", json=_fixture_08(), timeout=30)
    assert response.status_code == 200
    assert LoadBalancerSlsStub(None)._handle_response(response.json()) == 18


def test_a_remote_error_reaches_the_client_as_its_exception(
    workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)

    def divide(a, b):
        return a / b

    with pytest.raises(Exception, match=r"Remote execution failed: .*division by zero"):
        asyncio.run(_stub(workers["open"].base_url)(divide, None, None, True, 1, 0))


def test_with_a_token_the_client_needs_its_key(
    workers: dict[str, WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url = workers["token"].base_url
    stub = _stub(base_url)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="401"):
        asyncio.run(stub(add, None, None, True, 4, 5, scale=2))
    # The real client sends its API key as the bearer token.
    monkeypatch.setenv("RUNPOD_API_KEY", TOKEN)
    assert asyncio.run(stub(add, None, None, True, 4, 5, scale=2)) == 18


def test_with_a_token_wrong_or_missing_credentials_are_401_and_ping_stays_open(
    workers: dict[str, WorkerProcess],
) -> None:
    url = f"{workers['token'].base_url}/execute"
    body = _fixture_08()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401, headers
        assert "Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["success"] is True
    assert httpx.get(f"{workers['token'].base_url}/ping").status_code == 200


def test_load_2000_requests_from_16_clients_without_a_failure(
    workers: dict[str, WorkerProcess],
) -> None:
    total, clients = 2000, 16
    body = json.dumps(_fixture_08()).encode()
    expected = base64.b64encode(cloudpickle.dumps(18)).decode()

    async def one_client(count: int, latencies: list[float], failures: list[str]) -> None:
        async with httpx.AsyncClient(base_url=workers["open"].base_url, timeout=60) as client:
            for _ in range(count):
                t0 = time.perf_counter()
                try:
                    response = await client.post(
                        "/execute", content=body, headers={"Content-Type": "application/json"}
                    )
                    payload = response.json()
                    if response.status_code != 200 or payload.get("result") != expected:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                latencies.append(time.perf_counter() - t0)

    async def run() -> tuple[list[float], list[str], float]:
        latencies: list[float] = []
        failures: list[str] = []
        started = time.perf_counter()
        await asyncio.gather(
            *(one_client(total // clients, latencies, failures) for _ in range(clients))
        )
        return latencies, failures, time.perf_counter() - started

    latencies, failures, elapsed = asyncio.run(run())
    assert len(latencies) == total
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"\n{total} /execute from {clients} clients in {elapsed:.2f} s "
        f"({total / elapsed:.0f} req/s): p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms"
    )
    assert failures == []
