"""Recovery under load, through ``Runtime.execute``: a crash costs only its culprit, a recycle
costs the next request nothing, and nothing outlives its executor.

These run under process isolation whatever ``FLASHRT_ISOLATION`` says: they are about the
executor processes. ``tests/test_executor_shells.py`` runs the same behaviours through the
shells.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

PID = "def pid():\n    import os\n    return os.getpid()\n"
NAP = "def nap(seconds):\n    import os, time\n    time.sleep(seconds)\n    return os.getpid()\n"
CULPRIT = "def culprit(seconds):\n    import os, time\n    time.sleep(seconds)\n    os._exit(3)\n"
SPAWN = (
    "def spawn():\n    import subprocess\n"
    "    grouped = subprocess.Popen(['sleep', '317'])\n"
    "    own_session = subprocess.Popen(['sleep', '318'], start_new_session=True)\n"
    "    return [grouped.pid, own_session.pid]\n"
)


def _worker(make_worker: Any, **settings: Any) -> Any:
    return make_worker(isolation="process", **settings)


def _pid(worker: Any, wire: Any) -> int:
    return int(wire.dec(worker.execute(wire.function(PID, "pid"))))


def _gather(worker: Any, *bodies: Any) -> list[Any]:
    async def all_of() -> list[Any]:
        return list(await asyncio.gather(*(worker.rt.execute(body) for body in bodies)))

    return worker.run(all_of())  # type: ignore[no-any-return]


def _until(predicate: Any, worker: Any, seconds: float = 10.0) -> None:
    """Let the worker's loop run until ``predicate()`` holds (bounded)."""

    async def wait() -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            assert time.monotonic() < deadline, "condition never held"
            await asyncio.sleep(0.02)

    worker.run(wait())


def _spare_pid(worker: Any) -> int:
    _until(lambda: worker.rt.describe().pids("spare"), worker)
    return int(worker.rt.describe().pids("spare")[0])


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _gone_soon(pids: list[int], seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(_running, pids)):
        time.sleep(0.02)
    return [pid for pid in pids if _running(pid)]


# --- a crash costs only its culprit ---------------------------------------------------------


@pytest.mark.parametrize("pool", ["spare-and-zygote", "neither"])
def test_a_culprit_among_requests_in_flight_fails_alone(make_worker, wire, pool):
    settings = {} if pool == "spare-and-zygote" else {"spare": False, "zygote": False}
    worker = _worker(make_worker, **settings)
    serving = _pid(worker, wire)

    async def new_traffic() -> Any:  # sent while the retries run
        await asyncio.sleep(0.4)
        return await worker.rt.execute(wire.function(PID, "pid"))

    async def scenario() -> list[Any]:
        bodies = [wire.function(NAP, "nap", 0.8) for _ in range(4)]
        bodies.append(wire.function(CULPRIT, "culprit", 0.2))
        return list(await asyncio.gather(*(worker.rt.execute(b) for b in bodies), new_traffic()))

    *innocents, culprit, meanwhile = worker.run(scenario())
    assert culprit.success is False
    assert "exited with status 3" in culprit.error
    assert "ran twice" in culprit.error
    retried_on = []
    for answer in innocents:
        assert answer.success, answer.error
        assert "running it again" in answer.stdout
        retried_on.append(wire.dec(answer))
    assert len(set(retried_on)) == len(innocents)  # each retry alone, on an executor of its own
    new = int(wire.dec(meanwhile))
    assert new != serving
    assert new not in retried_on  # new traffic never shares an executor with a retry
    assert _pid(worker, wire) == new
    # The retries' executors go once they answered: the serving one (and the spare) stay.
    at_rest = 2 if pool == "spare-and-zygote" else 1
    _until(lambda: len(worker.rt.describe().executors) == at_rest, worker)
    assert _gone_soon(retried_on) == []


def test_culprits_in_a_row_never_delay_the_next_request(make_worker, wire, caplog):
    worker = _worker(make_worker)
    caplog.set_level(logging.INFO, logger="flashrt.supervisor")
    pids = set()
    for _ in range(8):
        died = worker.execute(wire.function(CULPRIT, "culprit", 0))
        assert "ran twice" in died.error
        pids.add(_pid(worker, wire))
    assert len(pids) == 8  # each harmless request on the executor that replaced the culprit's
    assert worker.rt.describe().backoff_s == 0
    assert not [r for r in caplog.records if "keep failing to start" in r.getMessage()]


def test_an_executor_that_cannot_start_backs_off_and_says_why(make_worker, wire, caplog):
    worker = _worker(make_worker, executor_start_timeout_s=3.0, retry_on_executor_death=False)
    caplog.set_level(logging.WARNING, logger="flashrt.supervisor")
    _pid(worker, wire)
    _spare_pid(worker)
    # From now on every new executor fails its Setup: its deployed handler does not exist.
    worker.rt.deployed_handler_resource = "no_such_resource"
    for _ in range(2):  # the spare (started before) takes over once; then none can start
        died = worker.execute(wire.function(CULPRIT, "culprit", 0))
        assert "exited with status 3" in died.error
    failed = worker.execute(wire.function(PID, "pid"))
    assert failed.success is False
    assert "could not start" in failed.error
    assert "no_such_resource" in failed.error
    assert worker.rt.problem is not None and "no_such_resource" in worker.rt.problem
    _until(lambda: any("keep failing to start" in r.getMessage() for r in caplog.records), worker)
    assert worker.rt.describe().backoff_s > 0


# --- a recycle costs the next request nothing -----------------------------------------------


def test_after_a_poison_the_spare_answers_the_next_request(make_worker, wire):
    worker = _worker(make_worker)
    _pid(worker, wire)
    spare = _spare_pid(worker)
    poison = "def poison():\n    import sys\n    sys.modules['cloudpickle'] = None\n    return 1\n"
    assert wire.dec(worker.execute(wire.function(poison, "poison"))) == 1
    assert _pid(worker, wire) == spare  # started before it was needed


def test_after_a_hard_timeout_the_spare_answers_the_next_request(make_worker, wire):
    worker = _worker(make_worker, hard_timeout_grace_s=0.2)
    _pid(worker, wire)
    spare = _spare_pid(worker)
    stuck = dict(wire.function(NAP, "nap", 30), timeout_s=0.3)
    assert "timed out" in worker.execute(stuck).error
    _until(lambda: worker.rt.describe().pids("serving") == [spare], worker)  # after the grace
    assert _pid(worker, wire) == spare


def test_at_rest_one_spare_and_after_shutdown_nothing(make_worker, wire):
    worker = _worker(make_worker)
    serving = _pid(worker, wire)
    spare = _spare_pid(worker)
    zygote = worker.rt.describe().zygote_pid
    assert zygote is not None
    for _ in range(3):
        _pid(worker, wire)
    assert {e.pid for e in worker.rt.describe().executors} == {serving, spare}
    worker.close()
    worker.close = lambda: None  # closed here, not again at teardown
    assert _gone_soon([serving, spare, zygote]) == []


def test_without_a_spare_or_zygote_recycles_still_work(make_worker, wire):
    worker = _worker(make_worker, spare=False, zygote=False)
    before = _pid(worker, wire)
    assert "exited with status 3" in worker.execute(wire.function(CULPRIT, "culprit", 0)).error
    after = _pid(worker, wire)
    assert after != before
    assert len(worker.rt.describe().executors) == 1
    assert worker.rt.describe().zygote_pid is None


# --- nothing outlives its executor ----------------------------------------------------------


def test_what_a_dead_executors_code_started_is_ended(make_worker, wire):
    worker = _worker(make_worker)
    _pid(worker, wire)
    children = wire.dec(worker.execute(wire.function(SPAWN, "spawn")))
    assert all(map(_running, children))
    died = worker.execute(wire.function(CULPRIT, "culprit", 0))
    assert "exited with status 3" in died.error
    assert _gone_soon(children) == []


def test_a_live_executors_children_are_left_alone_until_shutdown(make_worker, wire):
    worker = _worker(make_worker)
    _pid(worker, wire)
    children = wire.dec(worker.execute(wire.function(SPAWN, "spawn")))
    os.kill(_spare_pid(worker), signal.SIGKILL)  # another executor dies
    _spare_pid(worker)  # and is replaced
    time.sleep(0.7)  # past the grace its descendants get
    assert all(map(_running, children))
    worker.close()
    worker.close = lambda: None
    assert _gone_soon(children) == []


# --- the user's imports carried over --------------------------------------------------------

USES_COLORSYS = "def use():\n    import colorsys\n    return colorsys.rgb_to_hsv(1, 0, 0)[0]\n"
HAS_COLORSYS = (
    "def has():\n    import os, sys\n    return ['colorsys' in sys.modules, os.getpid()]\n"
)


@pytest.mark.parametrize("carry", [True, False])
def test_the_users_imports_are_carried_to_the_next_executor(make_worker, wire, carry):
    worker = _worker(make_worker, carry_imports=carry)
    first = _pid(worker, wire)
    assert wire.dec(worker.execute(wire.function(USES_COLORSYS, "use"))) == 0.0
    # Twice: the second replacement was forked after the zygote had imported what was reported.
    for _ in range(2):
        assert "ran twice" in worker.execute(wire.function(CULPRIT, "culprit", 0)).error
    imported, pid = wire.dec(worker.execute(wire.function(HAS_COLORSYS, "has")))
    assert pid != first
    assert imported is carry
