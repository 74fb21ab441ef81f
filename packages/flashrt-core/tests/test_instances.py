"""Class requests: instances live across requests, bounded by count and idle time."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

import pytest
from flashrt_core import InstanceRegistry

COUNTER = (
    "class Counter:\n"
    "    def __init__(self, start=0, *, step=1):\n"
    "        import uuid\n"
    "        self.value = start\n"
    "        self.step = step\n"
    "        self.token = uuid.uuid4().hex\n"
    "    def bump(self):\n"
    "        self.value += self.step\n"
    "        return self.value\n"
    "    def token_of(self):\n"
    "        return self.token\n"
    "    async def abump(self, times=1):\n"
    "        for _ in range(times):\n"
    "            self.value += self.step\n"
    "        return self.value\n"
    "    def _private(self):\n"
    "        pass\n"
    "    def __call__(self):\n"
    "        return 'called'\n"
)


def _bump(wire, instance_id, *, create=False, method="bump", ctor=((10,), {"step": 5})):
    return wire.method(
        COUNTER, "Counter", method, instance_id=instance_id, ctor=ctor, create_new_instance=create
    )


def test_instance_persists_across_requests(worker, wire):
    values = [wire.dec(worker.execute(_bump(wire, "Counter_a"))) for _ in range(3)]
    assert values == [15, 20, 25]
    assert wire.dec(worker.execute(_bump(wire, "Counter_a", method="abump"))) == 30


def test_unknown_id_is_built_even_when_create_new_instance_is_false(worker, wire):
    response = worker.execute(_bump(wire, "Counter_new", create=False))
    assert wire.dec(response) == 15
    assert response.instance_id == "Counter_new"
    assert response.instance_info["method_calls"] == 1


def test_create_new_instance_true_replaces(worker, wire):
    worker.execute(_bump(wire, "Counter_r"))
    worker.execute(_bump(wire, "Counter_r"))
    response = worker.execute(_bump(wire, "Counter_r", create=True))
    assert wire.dec(response) == 15
    assert response.instance_info["method_calls"] == 1
    assert wire.dec(worker.execute(_bump(wire, "Counter_r"))) == 20


def test_instance_info_fields(worker, wire):
    first = worker.execute(_bump(wire, "Counter_i"))
    time.sleep(0.01)
    second = worker.execute(_bump(wire, "Counter_i"))
    info = second.instance_info
    assert set(info) == {"class_name", "created_at", "method_calls", "last_used"}
    assert info["class_name"] == "Counter"
    assert info["method_calls"] == 2
    created = datetime.fromisoformat(info["created_at"])
    last_used = datetime.fromisoformat(info["last_used"])
    assert created.tzinfo is not None and created.utcoffset() == timezone.utc.utcoffset(None)
    assert info["created_at"] == first.instance_info["created_at"]
    assert last_used > created
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60


def test_missing_method_lists_the_public_methods(worker, wire):
    response = worker.execute(_bump(wire, "Counter_m", method="explode"))
    assert response.success is False
    assert "Counter has no method 'explode'" in response.error
    assert "public methods: abump, bump, token_of" in response.error
    assert "_private" not in response.error


def test_default_method_is_call(worker, wire):
    request = _bump(wire, "Counter_c")
    del request["method_name"]
    assert wire.dec(worker.execute(request)) == "called"


def test_class_not_found_lists_the_names_defined(worker, wire):
    request = wire.method(COUNTER, "Missing", "bump", instance_id="Missing_1")
    response = worker.execute(request)
    assert response.success is False
    assert "class 'Missing' not found" in response.error
    assert "Counter" in response.error


def test_instance_id_is_generated_when_the_request_has_none(worker, wire):
    response = worker.execute(_bump(wire, None))
    assert response.success
    assert response.instance_id.startswith("Counter_")
    assert len(response.instance_id) == len("Counter_") + 8


def test_constructor_failure_is_reported_and_nothing_is_kept(worker, wire):
    code = (
        "class Bad:\n"
        "    def __init__(self):\n"
        "        raise ValueError('no config')\n"
        "    def m(self):\n"
        "        return 1\n"
    )
    response = worker.execute(wire.method(code, "Bad", "m", instance_id="Bad_1"))
    assert response.success is False
    assert "no config" in response.error
    assert "Bad_1" not in worker.rt.instances


def test_registry_is_bounded_by_count_and_eviction_is_logged(make_worker, wire, caplog):
    worker = make_worker(max_instances=2, isolation="none")  # inspects the registry itself
    with caplog.at_level(logging.INFO, logger="flashrt.instances"):
        for name in ("A", "B", "C"):
            assert worker.execute(_bump(wire, f"Counter_{name}")).success
    assert len(worker.rt.instances) == 2
    assert "Counter_A" not in worker.rt.instances
    assert "evicted instance Counter_A" in caplog.text
    # Coming back after eviction builds a fresh instance.
    assert wire.dec(worker.execute(_bump(wire, "Counter_A"))) == 15


def test_least_recently_used_goes_first(make_worker, wire):
    worker = make_worker(max_instances=2, isolation="none")  # inspects the registry itself
    worker.execute(_bump(wire, "Counter_A"))
    worker.execute(_bump(wire, "Counter_B"))
    worker.execute(_bump(wire, "Counter_A"))  # A is now the most recent
    worker.execute(_bump(wire, "Counter_C"))
    assert "Counter_A" in worker.rt.instances
    assert "Counter_B" not in worker.rt.instances


def test_idle_instances_expire_after_the_ttl(make_worker, wire, caplog):
    worker = make_worker(instance_ttl_s=0.2, isolation="none")  # reads the registry's log
    assert wire.dec(worker.execute(_bump(wire, "Counter_t"))) == 15
    assert wire.dec(worker.execute(_bump(wire, "Counter_t"))) == 20
    time.sleep(0.3)
    with caplog.at_level(logging.INFO, logger="flashrt.instances"):
        response = worker.execute(_bump(wire, "Counter_t"))
    assert wire.dec(response) == 15
    assert response.instance_info["method_calls"] == 1
    assert "evicted idle instance Counter_t" in caplog.text


def test_same_id_with_another_class_is_replaced(worker, wire):
    worker.execute(_bump(wire, "shared_id"))
    other = "class Other:\n    def bump(self):\n        return 'other'\n"
    response = worker.execute(wire.method(other, "Other", "bump", instance_id="shared_id"))
    assert wire.dec(response) == "other"
    assert response.instance_info["class_name"] == "Other"


def test_concurrent_first_calls_build_one_instance(worker, wire):
    slow = COUNTER.replace(
        "        self.value = start\n",
        "        import time\n        time.sleep(0.2)\n        self.value = start\n",
    )

    async def scenario():
        requests = [
            wire.method(slow, "Counter", "token_of", instance_id="Counter_sf") for _ in range(8)
        ]
        return await asyncio.gather(*(worker.rt.execute(r) for r in requests))

    responses = worker.run(scenario())
    tokens = {wire.dec(r) for r in responses}
    assert len(tokens) == 1
    assert sorted(r.instance_info["method_calls"] for r in responses)[-1] == 8


def test_json_format_class_request(worker):
    request = {
        "execution_type": "class",
        "class_name": "Counter",
        "class_code": COUNTER,
        "method_name": "bump",
        "constructor_args": [1],
        "constructor_kwargs": {"step": 2},
        "instance_id": "Counter_json",
        "serialization_format": "json",
    }
    # create_new_instance defaults to true: each such request starts from a new instance.
    assert worker.execute(request).json_result == 3
    assert worker.execute(request).json_result == 3
    request["create_new_instance"] = False
    assert worker.execute(request).json_result == 5


# --- the registry on its own ---------------------------------------------------------------------


def test_registry_api():
    async def scenario():
        registry = InstanceRegistry(max_instances=3, idle_ttl_s=60)
        builds = 0

        async def factory():
            nonlocal builds
            builds += 1
            await asyncio.sleep(0.01)
            return object()

        entries = await asyncio.gather(
            *(registry.get_or_create("x", factory, class_name="X") for _ in range(5))
        )
        assert builds == 1
        assert len({id(e.instance) for e in entries}) == 1
        replaced = await registry.get_or_create("x", factory, class_name="X", replace=True)
        assert builds == 2 and replaced.instance is not entries[0].instance
        assert registry.get("x") is replaced
        assert registry.remove("x") is True
        assert registry.remove("x") is False
        assert len(registry) == 0

    asyncio.run(scenario())


def test_registry_factory_failure_keeps_nothing():
    async def scenario():
        registry = InstanceRegistry(max_instances=3, idle_ttl_s=60)

        async def factory():
            raise RuntimeError("cannot build")

        with pytest.raises(RuntimeError):
            await registry.get_or_create("y", factory, class_name="Y")
        assert "y" not in registry

    asyncio.run(scenario())


def test_failed_constructions_leave_no_lock_behind():
    registry = InstanceRegistry(max_instances=4, idle_ttl_s=60)

    async def broken() -> object:
        raise RuntimeError("constructor failed")

    async def scenario() -> None:
        for i in range(50):
            with pytest.raises(RuntimeError):
                await registry.get_or_create(f"id-{i}", broken, class_name="C")

    asyncio.run(scenario())
    assert len(registry) == 0
    assert len(registry._locks) == 0
