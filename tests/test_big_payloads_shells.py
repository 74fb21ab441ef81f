"""Big payloads through both shells as processes: ``flashrt-lb`` on real uvicorn and
``flashrt-qb``'s job loop against the fake control plane. The bytes come back equal, the worker
holds no out-of-band body afterwards, and the HTTP shell refuses an oversized body while it
arrives and a truncated one clearly.

Sizes per path: 1 and 16 MiB on the HTTP shell (isolated and in process), 64 MiB on the isolated
one; JSON arguments at 1 MiB. The queue shell's results must fit the platform's 20 MB job-done
limit (a larger one fails the job, see ``test_qb_worker``): it echoes 1 and 12 MiB (16.8 MB of
JSON) and takes a 16 MiB argument whose digest comes back.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from e2e_support import json_request, pickled_request, result_of, start_lb_shell, start_qb_shell

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from e2e_support import Shell, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow

MiB = 1 << 20
ECHO = "def echo(blob):\n    return blob\n"
DIGEST = "def digest(blob):\n    import hashlib\n    return hashlib.sha256(blob).hexdigest()\n"


def body_memfds(pid: int) -> list[str]:
    """The out-of-band bodies process ``pid`` holds: mappings and descriptors."""
    held = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "memfd:" in line]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            held.append(target)
    return held


@pytest.fixture(scope="module", params=["lb-process", "qb-process", "lb-none"])
def big_shell(
    request: pytest.FixtureRequest,
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Shell]]:
    kind, isolation = request.param.split("-")
    tmp = tmp_path_factory.mktemp(f"big-{request.param}")
    if kind == "lb":
        worker = start_lb_shell(
            spawn_worker, tmp, name=f"lb-big-{isolation}", FLASHRT_ISOLATION=isolation
        )
    else:
        worker = start_qb_shell(
            spawn_worker, fake_runpod, f"ep-qb-big-{isolation}", tmp, FLASHRT_ISOLATION=isolation
        )
    yield request.param, worker
    worker.process.stop()


def test_large_arguments_and_results_come_back_equal(big_shell: tuple[str, Shell]) -> None:
    which, shell = big_shell
    sizes = {"lb-process": [1, 16, 64], "lb-none": [1, 16], "qb-process": [1, 12]}[which]
    for mib in sizes:
        blob = os.urandom(mib * MiB)
        assert result_of(shell.execute(pickled_request("echo", ECHO, blob), 120)) == blob
    if which == "qb-process":
        blob = os.urandom(16 * MiB)
        digest = result_of(shell.execute(pickled_request("digest", DIGEST, blob), 120))
        assert digest == hashlib.sha256(blob).hexdigest()
    text = (string.ascii_letters * (MiB // len(string.ascii_letters) + 1))[:MiB]
    answer = shell.execute(json_request("echo", ECHO, text))
    assert answer["success"] is True, answer
    assert answer["json_result"] == text
    assert body_memfds(shell.pid) == []


def test_a_large_body_is_refused_while_it_arrives_and_a_truncated_one_clearly(
    spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    shell = start_lb_shell(
        spawn_worker, tmp_path, name="lb-big-limit", FLASHRT_MAX_REQUEST_BYTES=str(4 * MiB)
    )
    try:
        url = f"{shell.base_url}/execute"
        over = json.dumps(pickled_request("echo", ECHO, os.urandom(4 * MiB))).encode()

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused as the bytes arrive
            for start in range(0, len(over), 256 * 1024):
                yield over[start : start + 256 * 1024]

        refused = httpx.post(url, content=chunks(), timeout=60)
        assert refused.status_code == 413
        assert f"exceeds the limit of {4 * MiB} bytes" in refused.json()["error"]
        declared = httpx.post(url, content=over, timeout=60)
        assert declared.status_code == 413
        whole = json.dumps(pickled_request("echo", ECHO, os.urandom(2 * MiB))).encode()
        truncated = httpx.post(url, content=whole[: len(whole) // 2], timeout=60)
        assert truncated.status_code == 400
        assert "not valid JSON" in truncated.json()["error"]
        assert "truncated" in truncated.json()["error"]
        blob = os.urandom(2 * MiB)
        assert result_of(shell.execute(pickled_request("echo", ECHO, blob))) == blob
    finally:
        shell.process.stop()
