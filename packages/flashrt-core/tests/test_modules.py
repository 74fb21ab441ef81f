"""A request's ``modules``: importable while its code runs, gone afterwards, paths checked."""

from __future__ import annotations

import asyncio
import sys

import pytest
from flashrt_core import StageError
from flashrt_core.modules import validate_modules

USES_HELPER = "def f(x):\n    from helper_mod import scale\n    return scale(x)\n"


def _with_modules(wire, code, name, modules, *args):
    request = wire.function(code, name, *args)
    request["modules"] = modules
    return request


@pytest.fixture
def clean_state():
    """sys.path and sys.modules before; the test asserts they are the same after."""
    return list(sys.path), set(sys.modules)


def _assert_clean(clean_state, tmp_dir=None):
    path_before, modules_before = clean_state
    assert sys.path == path_before
    leaked = {m for m in set(sys.modules) - modules_before if m.startswith(("helper", "pkg"))}
    assert not leaked
    if tmp_dir is not None:
        assert list(tmp_dir.iterdir()) == []


def test_modules_are_importable_then_removed(make_worker, wire, tmp_path, clean_state):
    worker = make_worker(tmp_dir=tmp_path)
    modules = {"helper_mod.py": "def scale(x):\n    return x * 3\n"}
    assert wire.dec(worker.execute(_with_modules(wire, USES_HELPER, "f", modules, 7))) == 21
    _assert_clean(clean_state, tmp_path)


def test_packages_and_import_at_load_time(make_worker, wire, tmp_path, clean_state):
    worker = make_worker(tmp_dir=tmp_path)
    modules = {
        "pkg/__init__.py": "BASE = 100\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/calc.py": "from pkg import BASE\ndef add(x):\n    return BASE + x\n",
    }
    code = "from pkg.sub.calc import add\ndef f(x):\n    return add(x)\n"
    assert wire.dec(worker.execute(_with_modules(wire, code, "f", modules, 5))) == 105
    _assert_clean(clean_state, tmp_path)


def test_each_request_imports_its_own_version(worker, wire, clean_state):
    for factor in (2, 3, 4):
        modules = {"helper_mod.py": f"def scale(x):\n    return x * {factor}\n"}
        response = worker.execute(_with_modules(wire, USES_HELPER, "f", modules, 10))
        assert wire.dec(response) == 10 * factor
    _assert_clean(clean_state)


def test_concurrent_requests_with_colliding_module_names_each_get_their_own(
    worker, wire, clean_state
):
    code = (
        "async def f(x):\n"
        "    import asyncio\n"
        "    from helper_mod import scale\n"
        "    await asyncio.sleep(0.02)\n"
        "    from helper_mod import scale as again\n"
        "    return scale(x), again(x)\n"
    )

    async def scenario():
        requests = [
            _with_modules(
                wire, code, "f", {"helper_mod.py": f"def scale(x):\n    return x * {k}\n"}, 1
            )
            for k in range(6)
        ]
        return await asyncio.gather(*(worker.rt.execute(r) for r in requests))

    results = [wire.dec(r) for r in worker.run(scenario())]
    assert results == [(k, k) for k in range(6)]
    _assert_clean(clean_state)
    if not worker.rt.isolated:  # in an executor, its own pipeline holds the locks
        assert len(worker.rt._pipeline._module_locks) == 0, "a lock outlives its users"


def test_a_request_cancelled_while_waiting_for_module_names_releases_them(
    worker, wire, clean_state
):
    slow = "async def f(x):\n    import asyncio\n    await asyncio.sleep(0.3)\n    return x\n"
    both = {"a_mod.py": "A = 1\n", "b_mod.py": "B = 1\n"}

    async def scenario():
        holder = asyncio.ensure_future(
            worker.rt.execute(_with_modules(wire, slow, "f", {"b_mod.py": "B = 2\n"}, 1))
        )
        await asyncio.sleep(0.05)  # holder now holds b_mod
        waiter = asyncio.ensure_future(worker.rt.execute(_with_modules(wire, slow, "f", both, 2)))
        await asyncio.sleep(0.05)  # waiter holds a_mod, waits for b_mod
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await holder
        # a_mod must be free again: this finishes instead of waiting forever.
        return await asyncio.wait_for(
            worker.rt.execute(_with_modules(wire, slow, "f", {"a_mod.py": "A = 3\n"}, 3)), 5
        )

    assert wire.dec(worker.run(scenario())) == 3
    _assert_clean(clean_state)
    if not worker.rt.isolated:
        assert len(worker.rt._pipeline._module_locks) == 0


def test_modules_are_removed_after_a_failure_too(make_worker, wire, tmp_path, clean_state):
    worker = make_worker(tmp_dir=tmp_path)
    code = "def f():\n    import helper_mod\n    raise RuntimeError('user failure')\n"
    response = worker.execute(_with_modules(wire, code, "f", {"helper_mod.py": "X = 1\n"}))
    assert response.success is False
    assert "user failure" in response.error
    _assert_clean(clean_state, tmp_path)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/evil.py", "absolute paths are not allowed"),
        ("../evil.py", "'..', '.' and empty path segments are not allowed"),
        ("pkg/../../evil.py", "'..'"),
        ("pkg//x.py", "empty path segments"),
        ("./x.py", "'.'"),
        ("pkg\\evil.py", "not a POSIX relative path"),
        ("", "not a POSIX relative path"),
        ("nul\x00.py", "not a POSIX relative path"),
    ],
)
def test_unsafe_paths_are_rejected_before_touching_the_disk(
    make_worker, wire, tmp_path, clean_state, path, message
):
    worker = make_worker(tmp_dir=tmp_path)
    response = worker.execute(_with_modules(wire, USES_HELPER, "f", {path: "X = 1\n"}, 1))
    assert response.success is False
    assert response.error.startswith(f"modules: {path!r}")
    assert message in response.error
    _assert_clean(clean_state, tmp_path)


def test_oversize_modules_are_rejected(make_worker, wire, tmp_path, clean_state):
    worker = make_worker(tmp_dir=tmp_path, max_modules_bytes=100)
    modules = {"a.py": "x" * 60, "b.py": "y" * 60}
    response = worker.execute(_with_modules(wire, USES_HELPER, "f", modules, 1))
    assert response.success is False
    assert "modules: total size exceeds the limit of 100 bytes" in response.error
    _assert_clean(clean_state, tmp_path)


def test_file_and_directory_of_the_same_name_fail_cleanly(make_worker, wire, tmp_path, clean_state):
    worker = make_worker(tmp_dir=tmp_path)
    modules = {"helper": "X = 1\n", "helper/mod.py": "Y = 2\n"}
    response = worker.execute(_with_modules(wire, USES_HELPER, "f", modules, 1))
    assert response.success is False
    assert "could not write modules" in response.error
    _assert_clean(clean_state, tmp_path)


def test_validate_modules_direct():
    files = validate_modules({"a.py": "", "pkg/b.py": "print('é')"}, 1000)
    assert [str(p) for p, _ in files] == ["a.py", "pkg/b.py"]
    with pytest.raises(StageError) as info:
        validate_modules({"a.py": 3}, 1000)
    assert info.value.stage == "decode"
    assert "source must be a string, got int" in info.value.message
