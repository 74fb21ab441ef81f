"""User code that kills, poisons or outlasts its executor, through both real shells.

``flashrt-lb`` under real uvicorn (its console script) and ``flashrt-qb`` in the runpod SDK's
job loop against the fake control plane. User code runs in a supervised executor process
(``FLASHRT_ISOLATION=process``, the default): whatever it does to that process, the request is
answered with what happened, and the next request is answered correctly by the same worker
process, whose fresh executor is its child (or its zygote's).

One worker per shell serves the whole module (the ``shell`` fixture is parametrized, so pytest
runs every test on the LB worker, stops it, then on the QB worker).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2e_support import (
    descends_from,
    pickled_request,
    result_of,
    start_lb_shell,
    start_qb_shell,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from e2e_support import Shell, WorkerProcess
    from fake_runpod import FakeRunPod

pytestmark = pytest.mark.slow  # real worker subprocesses

WHOAMI = """\
def whoami(tag):
    import os
    print(f"whoami {tag}")
    return {"tag": tag, "pid": os.getpid(), "ppid": os.getppid()}
"""

EXIT_7 = """\
def exit_seven():
    import os
    print("about to exit 7", flush=True)
    os._exit(7)
"""

SIGKILL_SELF = """\
def kill_myself():
    import os, signal
    print("about to SIGKILL myself", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""

NULL_READ = """\
def null_read():
    import ctypes
    print("about to read NULL", flush=True)
    return ctypes.string_at(0)
"""

POISON = """\
def poison():
    import sys
    sys.modules["cloudpickle"] = None
    return "poisoned"
"""

SIGALRM_HANDLER = """\
def install_alarm_handler():
    import signal
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.signal(signal.SIGALRM, previous)
    return True
"""

OVERSLEEP = """\
def oversleep(seconds):
    import time
    print("going to sleep", flush=True)
    time.sleep(seconds)
    return "woke up"
"""

SPAN = """\
def span(seconds):
    import time
    started = time.monotonic()
    time.sleep(seconds)
    return [started, time.monotonic()]
"""


@pytest.fixture(scope="module", params=["lb", "qb"])
def shell(
    request: pytest.FixtureRequest,
    fake_runpod: FakeRunPod,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shell]:
    tmp = tmp_path_factory.mktemp(f"executor-{request.param}")
    if request.param == "lb":
        worker = start_lb_shell(spawn_worker, tmp, name="lb-executor")
    else:
        # One job at a time (the default): a queued job starts when the one before returned.
        worker = start_qb_shell(spawn_worker, fake_runpod, "ep-qb-executor", tmp)
    yield worker
    worker.process.stop()  # not left running for the rest of the session


def _executor_of_next_request(shell: Shell, tag: str) -> dict[str, Any]:
    """A normal request after a bad one: answered correctly, by this same worker process."""
    assert shell.alive(), shell.process.log()[-3000:]
    response = shell.execute(pickled_request("whoami", WHOAMI, tag))
    who = result_of(response)
    assert who["tag"] == tag
    assert response["stdout"] == f"whoami {tag}\n"
    # The executor is the same worker process's child, or its zygote's.
    assert descends_from(who["pid"], shell.pid)
    assert shell.alive()
    return who


def _failure(response: dict[str, Any]) -> str:
    assert response["success"] is False, response
    error = response["error"]
    assert isinstance(error, str), response
    return error


def test_a_normal_request_runs_in_a_child_executor(shell: Shell) -> None:
    who = _executor_of_next_request(shell, "first")
    assert who["pid"] != shell.pid


def test_os_exit_7_fails_naming_the_status(shell: Shell) -> None:
    before = _executor_of_next_request(shell, "before-exit")
    error = _failure(shell.execute(pickled_request("exit_seven", EXIT_7)))
    assert "exited with status 7" in error
    after = _executor_of_next_request(shell, "after-exit")
    assert after["pid"] != before["pid"]  # a fresh executor


def test_sigkill_of_the_executor_fails_naming_sigkill(shell: Shell) -> None:
    before = _executor_of_next_request(shell, "before-kill")
    error = _failure(shell.execute(pickled_request("kill_myself", SIGKILL_SELF)))
    assert "killed by SIGKILL" in error
    assert _executor_of_next_request(shell, "after-kill")["pid"] != before["pid"]


def test_a_null_read_fails_naming_sigsegv(shell: Shell) -> None:
    before = _executor_of_next_request(shell, "before-segv")
    response = shell.execute(pickled_request("null_read", NULL_READ))
    assert "killed by signal 11 (SIGSEGV)" in _failure(response)
    assert "about to read NULL" in (response.get("stdout") or "")  # the output so far
    assert _executor_of_next_request(shell, "after-segv")["pid"] != before["pid"]


def test_poisoning_cloudpickle_after_using_it_answers_that_request_and_the_next_ones(
    shell: Shell,
) -> None:
    _executor_of_next_request(shell, "before-poison")  # this executor has unpickled arguments
    assert result_of(shell.execute(pickled_request("poison", POISON))) == "poisoned"
    for i in range(3):  # all cloudpickle requests: the poisoned executor is not used again
        _executor_of_next_request(shell, f"after-poison-{i}")


def test_qb_a_job_queued_behind_a_poisoning_one_runs_once_on_a_fresh_executor(
    shell: Shell,
) -> None:
    if shell.kind != "qb":
        pytest.skip("a queue of jobs is the QB shell's")
    _executor_of_next_request(shell, "before-queued-poison")
    poisoned, after = shell.execute_queued(
        [pickled_request("poison", POISON), pickled_request("whoami", WHOAMI, "queued")]
    )
    assert result_of(poisoned) == "poisoned"
    # The queued job's handler started after the poisoning one had returned (one job at a time),
    # so the supervisor already had the poisoned executor's answer, which says it is exiting.
    # The job must go to the fresh executor and run once: not be "retried" as if it had run on
    # the poisoned one.
    assert descends_from(result_of(after)["pid"], shell.pid)
    wait_until(
        lambda: shell.recorder.arrival("whoami queued") is not None, 30, "the queued job's echo"
    )
    seen = shell.recorder.lines()
    start = max(i for i, line in enumerate(seen) if "before-queued-poison" in line)
    assert seen.count("whoami queued") == 1, (after["stdout"], seen[start:])  # it ran once
    assert after["stdout"] == "whoami queued\n", seen[start:]
    _executor_of_next_request(shell, "after-queued-poison")


def test_poisoning_cloudpickle_on_a_fresh_executor_answers_that_request_and_the_next_ones(
    shell: Shell,
) -> None:
    _executor_of_next_request(shell, "before-poisons")
    assert result_of(shell.execute(pickled_request("poison", POISON))) == "poisoned"
    # That executor was replaced: this poisoning request (no arguments, so nothing unpickled
    # before it) is the first thing the fresh one runs.
    assert result_of(shell.execute(pickled_request("poison", POISON))) == "poisoned"
    for i in range(2):
        _executor_of_next_request(shell, f"after-fresh-poison-{i}")


def test_a_sync_function_can_install_a_signal_handler(shell: Shell) -> None:
    response = shell.execute(pickled_request("install_alarm_handler", SIGALRM_HANDLER))
    assert result_of(response) is True
    _executor_of_next_request(shell, "after-signal")


def test_a_sync_function_past_its_timeout_fails_and_the_next_request_succeeds(
    shell: Shell,
) -> None:
    response = shell.execute(pickled_request("oversleep", OVERSLEEP, 30, timeout_s=1))
    assert "timed out after 1 s" in _failure(response)
    assert "going to sleep" in (response.get("stdout") or "")
    _executor_of_next_request(shell, "after-timeout")


def test_lb_concurrent_sync_sleeps_overlap_and_ping_answers_meanwhile(shell: Shell) -> None:
    if shell.kind != "lb":
        pytest.skip("HTTP concurrency and /ping are the LB shell's")
    assert shell.base_url is not None
    results: list[Any] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(result_of(shell.execute(pickled_request("span", SPAN, 0.5))))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    pings: list[int] = []
    try:
        # While they run (until all are back), /ping keeps answering.
        while any(t.is_alive() for t in threads) or not pings:
            pings.append(httpx.get(f"{shell.base_url}/ping", timeout=10).status_code)
            if len(pings) > 2000:
                break
    finally:
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert len(results) == 8
    assert pings and set(pings) == {200}
    # They overlapped: every one started before the first one ended.
    first_end = min(end for _, end in results)
    assert all(start < first_end for start, _ in results), results
    _executor_of_next_request(shell, "after-concurrency")


CULPRIT = """\
def culprit(seconds):
    import os, time
    time.sleep(seconds)
    os._exit(3)
"""

NAP = """\
def nap(seconds):
    import os, time
    time.sleep(seconds)
    return os.getpid()
"""

SPAWN = """\
def spawn():
    import subprocess
    grouped = subprocess.Popen(["sleep", "317"])
    own_session = subprocess.Popen(["sleep", "318"], start_new_session=True)
    return [grouped.pid, own_session.pid]
"""


def _running(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def test_culprits_in_a_row_cost_the_next_request_nothing(shell: Shell) -> None:
    for i in range(4):
        error = _failure(shell.execute(pickled_request("culprit", CULPRIT, 0)))
        assert "ran twice" in error
        _executor_of_next_request(shell, f"after-culprit-{i}")


def test_lb_a_culprit_among_requests_in_flight_fails_alone(shell: Shell) -> None:
    if shell.kind != "lb":
        pytest.skip("HTTP concurrency is the LB shell's")
    answers: dict[str, dict[str, Any]] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        answers[name] = shell.execute(body)

    threads = [
        threading.Thread(target=send, args=(f"innocent-{i}", pickled_request("nap", NAP, 0.8)))
        for i in range(3)
    ]
    threads.append(
        threading.Thread(target=send, args=("culprit", pickled_request("culprit", CULPRIT, 0.2)))
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert "ran twice" in _failure(answers.pop("culprit"))
    retried_on = set()
    for answer in answers.values():
        retried_on.add(result_of(answer))  # succeeded
        assert "running it again" in (answer.get("stdout") or "")
    assert len(retried_on) == 3  # each alone, on an executor of its own
    assert _executor_of_next_request(shell, "after-culprit-in-flight")["pid"] not in retried_on


def test_what_a_dead_executors_code_started_is_ended(shell: Shell) -> None:
    children = result_of(shell.execute(pickled_request("spawn", SPAWN)))
    assert all(map(_running, children))
    assert "exited with status 3" in _failure(shell.execute(pickled_request("culprit", CULPRIT, 0)))
    wait_until(lambda: not any(map(_running, children)), 5, "the dead executor's children")
    _executor_of_next_request(shell, "after-children")


def test_the_worker_survived_the_whole_module(shell: Shell) -> None:
    assert shell.alive()
    _executor_of_next_request(shell, "last")
