"""The user's imports carried to the next executor: ``preload``, and the ``Imported`` report.

The report is read straight off a real executor's channel (:class:`RawExecutor`, the frames the
supervisor would see): the supervisor side that hands it to the next executor is tested with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from flashrt_core import channel as ch
from flashrt_core.executor.carry import ImportReport, preload
from flashrt_core.settings import Settings, load_settings, settings_to_dict

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def _origin(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    return spec.origin


def _write(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(source, encoding="utf-8")


@pytest.fixture
def import_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on ``sys.path`` for this test's modules, removed with them afterwards."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in set(sys.modules) - before:
            del sys.modules[name]


# --- preload ---------------------------------------------------------------------------------


def test_preload_imports_a_module_whose_origin_matches(import_dir):
    _write(import_dir, "carry_match", "VALUE = 1\n")
    assert preload({"carry_match": str(import_dir / "carry_match.py")}) == ["carry_match"]
    assert sys.modules["carry_match"].VALUE == 1


def test_preload_skips_a_module_found_elsewhere(import_dir):
    _write(import_dir, "carry_elsewhere", "VALUE = 1\n")
    assert preload({"carry_elsewhere": "/somewhere/else/carry_elsewhere.py"}) == []
    assert "carry_elsewhere" not in sys.modules


def test_preload_skips_missing_and_failing_modules_and_imports_the_rest(import_dir):
    _write(import_dir, "carry_exits", "raise SystemExit(3)\n")
    _write(import_dir, "carry_interrupts", "raise KeyboardInterrupt\n")
    _write(import_dir, "carry_raises", "raise ImportError('no')\n")
    _write(import_dir, "carry_fine", "VALUE = 2\n")
    asked = {
        "carry_missing_module": "/nowhere/carry_missing_module.py",
        "carry.dotted": "/nowhere/carry/dotted.py",
        **{n: str(import_dir / f"{n}.py") for n in ("carry_exits", "carry_interrupts")},
        "carry_raises": str(import_dir / "carry_raises.py"),
        "carry_fine": str(import_dir / "carry_fine.py"),
    }
    assert preload(asked) == ["carry_fine"]
    assert "carry_exits" not in sys.modules


def test_preload_takes_built_in_modules_by_their_origin():
    assert preload({"sys": "built-in", "json": _origin("json")}) == ["sys", "json"]
    assert preload({"sys": "frozen"}) == []


# --- what is reported --------------------------------------------------------------------------


def test_the_report_keeps_to_the_import_path_at_ready_and_reports_once(import_dir, tmp_path):
    ready = tmp_path / "ready"
    later = tmp_path / "later"
    ready.mkdir()
    later.mkdir()
    _write(ready, "carry_ready", "")
    _write(later, "carry_later", "")
    _write(ready, "_carry_private", "")
    stdlib = os.path.dirname(_origin("colorsys"))
    # Other tests may have imported colorsys in this process already: not at this "ready".
    report = ImportReport([str(ready), stdlib], set(sys.modules) - {"colorsys"})
    sys.path[:0] = [str(ready), str(later)]
    try:
        for name in ("carry_ready", "carry_later", "_carry_private", "colorsys"):
            __import__(name)
    finally:
        del sys.path[:2]
    names = ["carry_ready", "carry_later", "_carry_private", "colorsys", "json", "os.path"]
    assert report.new(names) == {
        "carry_ready": str(ready / "carry_ready.py"),
        "colorsys": _origin("colorsys"),
    }
    assert report.new(names) == {}


# --- through a real executor -------------------------------------------------------------------


class RawExecutor:
    """``python -m flashrt_core.executor`` on our own socketpair: the supervisor's view."""

    def __init__(self, path: tuple[str, ...] = (), **settings: Any) -> None:
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashrt_core.executor"],
            stdin=child.fileno(),
            start_new_session=True,
        )
        child.close()
        self.chan = ch.Channel(parent)
        self.readers = {self.chan.fd: ch.FrameReader()}
        self.pending: list[ch.Frame] = []
        self.next_id = 0
        made = load_settings(Settings, {}, disable_plugin_autoload=True, **settings)
        values = settings_to_dict(made)
        self.chan.send(ch.Setup(settings=values, sys_path=[*path, *sys.path]))
        hello = self.until(ch.Hello)
        assert hello.error is None, hello.error

    def _read(self, timeout: float) -> None:
        poller = select.poll()
        for fd in self.readers:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(timeout * 1000):
            data = os.read(fd, 1 << 20)
            assert data, "the executor went away"
            self.pending += self.readers[fd].feed(data)

    def until(self, kind: type[Any], timeout: float = 30.0) -> Any:
        """Frames up to the first ``kind``; the ones before it are kept in ``seen``."""
        deadline = time.monotonic() + timeout
        self.seen: list[ch.Frame] = []
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if isinstance(frame, kind):
                    return frame
                self.seen.append(frame)
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind.__name__} within {timeout} s; saw {self.seen}"
            self._read(left)

    def call(self, code: str, name: str, **fields: Any) -> tuple[Any, list[Any]]:
        """Run one request; its response and the ``Imported`` frames sent before it."""
        self.next_id += 1
        body = json.dumps(
            {
                "function_name": name,
                "function_code": code,
                "args": [],
                "kwargs": {},
                "serialization_format": "json",
                **fields,
            }
        ).encode()
        self.chan.send(ch.Execute(self.next_id, body))
        result = self.until(ch.Result)
        imported = [f.modules for f in self.seen if isinstance(f, ch.Imported)]
        response = _decode(result.body)
        assert response["success"], response.get("error")
        return response, imported

    def after(self) -> list[dict[str, str]]:
        """The ``Imported`` frames sent after the last answer (the next answer comes after
        them)."""
        _, imported = self.call("def ping():\n    return 1\n", "ping")
        return imported

    def close(self) -> None:
        self.chan.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _decode(body: bytes) -> Any:
    return msgspec.json.decode(body)  # a Result carries the response's JSON


@pytest.fixture
def raw_executor() -> Iterator[Any]:
    made: list[RawExecutor] = []

    def factory(path: tuple[str, ...] = (), **settings: Any) -> RawExecutor:
        made.append(RawExecutor(path, **settings))
        return made[-1]

    yield factory
    for executor in made:
        executor.close()


IMPORT = "def use():\n    import {0}\n    return {0}.__name__\n"


def test_the_executor_reports_new_imports_once_after_the_answer(raw_executor, tmp_path):
    executor = raw_executor()
    # Not on the import path at ready: never reported, whoever imports it.
    _write(tmp_path, "carry_mine", "")
    put_on_path = (
        f"def use():\n    import sys\n    sys.path.insert(0, {str(tmp_path)!r})\n"
        "    import carry_mine\n    return 'mine'\n"
    )
    assert executor.call(put_on_path, "use")[0]["json_result"] == "mine"
    assert executor.after() == []
    response, _ = executor.call(IMPORT.format("colorsys"), "use")
    assert response["json_result"] == "colorsys"
    assert executor.after() == [{"colorsys": _origin("colorsys")}]
    # Again, and a module flashrt had imported at ready: nothing new.
    executor.call(IMPORT.format("colorsys"), "use")
    executor.call(IMPORT.format("json"), "use")
    assert executor.after() == []


def test_a_requests_own_modules_are_never_reported(raw_executor):
    executor = raw_executor()
    code = "def use():\n    import carry_helper\n    return carry_helper.X\n"
    response, _ = executor.call(code, "use", modules={"carry_helper.py": "X = 3\n"})
    assert response["json_result"] == 3
    assert executor.after() == []


def test_reporting_can_be_turned_off(raw_executor):
    executor = raw_executor(carry_imports=False)
    executor.call(IMPORT.format("colorsys"), "use")
    assert executor.after() == []


def test_a_preload_imports_in_the_background_captured_by_no_request(raw_executor, capfd):
    executor = raw_executor()
    # ``this`` prints the Zen of Python when imported; colorsys comes after it.
    executor.chan.send(ch.Preload({"this": _origin("this"), "colorsys": _origin("colorsys")}))
    wait = (
        "def wait():\n    import sys, time\n"
        "    for _ in range(500):\n"
        "        if 'colorsys' in sys.modules:\n            return sorted(\n"
        "                n for n in ('this', 'colorsys') if n in sys.modules)\n"
        "        time.sleep(0.01)\n"
        "    return []\n"
    )
    response, _ = executor.call(wait, "wait")
    assert response["json_result"] == ["colorsys", "this"]
    assert "Beautiful is better" not in (response.get("stdout") or "")
    # Already known to the supervisor: not reported back.
    assert executor.after() == []
    executor.close()
    assert "Beautiful is better than ugly" in capfd.readouterr().out


def test_what_a_preload_changes_in_sys_modules_is_not_poison(raw_executor, tmp_path):
    # An import that swaps another module's entry (as some packages' import-time shims do):
    # were it poison, every executor that preloads it would be retired after its first answer.
    _write(
        tmp_path,
        "carry_swapper",
        "import sys, types\nsys.modules['json'] = types.ModuleType('json')\n",
    )
    executor = raw_executor(path=(str(tmp_path),))
    executor.chan.send(ch.Preload({"carry_swapper": str(tmp_path / "carry_swapper.py")}))
    wait = (
        "def wait():\n    import sys, time\n"
        "    for _ in range(500):\n"
        "        if 'carry_swapper' in sys.modules:\n            break\n"
        "        time.sleep(0.01)\n"
        "    time.sleep(0.2)\n    return os.getpid()\n"
    )
    pid = executor.call("import os\n" + wait, "wait")[0]["json_result"]
    assert executor.call("import os\n" + wait, "wait")[0]["json_result"] == pid
    assert not [f for f in executor.seen if isinstance(f, ch.Exiting)]
