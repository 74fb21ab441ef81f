"""The recorded client requests through Runtime.execute, answered back through the real client.

Each response is JSON-encoded, parsed by runpod_flash's own FunctionResponse model and decoded by
``LiveServerlessStub.handle_response``: the value must be what fixtures/README.md says the client
returned to its caller.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "fixtures" / "client-requests"


@pytest.fixture
def worker(module_worker: Any) -> Any:
    """One runtime for the module: its tests only send requests and read the answers."""
    return module_worker


def test_01_sync_function_with_args_and_kwargs(worker, fixture_bodies, client):
    (body,) = fixture_bodies("01")
    response = worker.execute(body)
    assert client.decode(response) == 50
    assert response.stdout == "adding 2 + 3\n"


def test_02_async_function(worker, fixture_bodies, client):
    (body,) = fixture_bodies("02")
    assert client.decode(worker.execute(body)) == {"greeting": "hello flash"}


def test_04_local_modules_importable_then_gone(worker, fixture_bodies, client):
    (body,) = fixture_bodies("04")
    path_before = list(sys.path)
    assert client.decode(worker.execute(body)) == 21
    assert sys.path == path_before
    assert "helper_mod" not in sys.modules


def test_05_three_calls_on_one_instance(worker, fixture_bodies, client):
    bodies = fixture_bodies("05")
    assert len(bodies) == 3
    # The real client sends create_new_instance false on every call, the first included.
    assert all(b["input"]["create_new_instance"] is False for b in bodies)
    responses = [worker.execute(b) for b in bodies]
    values = [client.decode(r) for r in responses]
    assert values == [{"value": 211, "calls": 1}, {"value": 102, "calls": 2}, 70]

    instance_id = bodies[0]["input"]["instance_id"]
    assert [r.instance_id for r in responses] == [instance_id] * 3
    infos = [r.instance_info for r in responses]
    assert [i["method_calls"] for i in infos] == [1, 2, 3]
    assert {i["class_name"] for i in infos} == {"Calculator"}
    assert len({i["created_at"] for i in infos}) == 1
    created = datetime.fromisoformat(infos[0]["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert datetime.fromisoformat(infos[2]["last_used"]) >= created


def test_06_user_error_raises_in_the_client(worker, fixture_bodies, client):
    (body,) = fixture_bodies("06")
    response = worker.execute(body)
    assert response.success is False
    assert response.stdout == "about to fail\n"
    with pytest.raises(Exception, match=r"^Remote execution failed: bad value 42") as info:
        client.decode(response)
    message = str(info.value)
    assert "ValueError" in message
    assert 'raise ValueError(f"bad value {x}")' in message  # the user's own line, in the traceback
    assert "failed during call" in message


def test_07_json_serialization_format(worker, fixture_bodies, client):
    (body,) = fixture_bodies("07")
    response = worker.execute(body)
    assert response.result is None
    assert response.json_result == 50
    assert client.decode(response) == 50


def test_08_load_balancer_bare_body(worker, fixture_bodies, client):
    (body,) = fixture_bodies("08")
    assert "input" not in body
    response = worker.execute(body)
    assert response.result is not None  # the LB decoder requires `result` on success
    assert client.decode(response) == 18


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared fixtures are not next to this clone")
def test_fixture_copies_match_the_shared_originals():
    here = Path(__file__).parent / "fixtures" / "client-requests"
    names = sorted(p.name for p in SHARED.glob("*.json"))
    assert names == sorted(p.name for p in here.glob("*.json"))
    for name in names:
        assert (here / name).read_bytes() == (SHARED / name).read_bytes(), name
