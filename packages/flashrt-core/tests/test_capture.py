"""Per-request output capture: prints, stderr and log records land in the right response only."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading

import pytest
from flashrt_core import capture
from flashrt_core.capture import TRUNCATION_MARKER, OutputBuffer

# --- the buffer ---------------------------------------------------------------------------------


def test_buffer_is_bounded_with_a_marker():
    buf = OutputBuffer(10)
    buf.write("12345")
    buf.write("67890abc")
    buf.write("more")
    assert buf.getvalue() == "1234567890" + TRUNCATION_MARKER.format(limit=10)


def test_buffer_under_the_limit_has_no_marker_and_drops_writes_after_close():
    buf = OutputBuffer(100)
    buf.write("hello\n")
    buf.close()
    buf.write("too late\n")
    assert buf.getvalue() == "hello\n"


def test_buffer_is_thread_safe():
    buf = OutputBuffer(1_000_000)

    def writer(tag: str) -> None:
        for _ in range(500):
            buf.write(tag * 10)

    threads = [threading.Thread(target=writer, args=(c,)) for c in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = buf.getvalue()
    assert len(text) == 4 * 500 * 10
    assert all(text.count(c) == 5000 for c in "abcd")


# --- routing --------------------------------------------------------------------------------


def test_activation_is_reference_counted_and_restores_the_streams():
    out, err = sys.stdout, sys.stderr
    capture.activate()
    capture.activate()
    try:
        assert sys.stdout is not out
        capture.deactivate()
        assert sys.stdout is not out  # one request still running
    finally:
        capture.deactivate()
    assert sys.stdout is out
    assert sys.stderr is err


def test_router_sends_output_of_no_request_to_the_real_stream(capsys):
    capture.activate()
    try:
        print("nobody's output")
        buf = OutputBuffer(100)
        token = capture.use_buffer(buf)
        try:
            print("captured")
            assert sys.stdout.isatty() is False
        finally:
            capture.reset_buffer(token)
        print("nobody's again")
    finally:
        capture.deactivate()
    assert buf.getvalue() == "captured\n"
    assert capsys.readouterr().out == "nobody's output\nnobody's again\n"


@pytest.mark.parametrize("left", [None, "own", "closed"])
def test_a_stream_a_request_replaced_is_restored_for_the_next(left):
    out = sys.stdout
    capture.activate()
    try:
        if left == "own":
            sys.stdout = io.StringIO()
        elif left == "closed":
            sys.stdout.close()  # the router ignores it: the process's stdout stays open
        else:
            sys.stdout = None  # type: ignore[assignment]
    finally:
        capture.deactivate()
    try:
        assert sys.stdout is out
        assert not sys.stdout.closed
    finally:
        sys.stdout = out


# --- through the runtime ------------------------------------------------------------------------


def test_print_stderr_and_logging_land_in_stdout(worker, wire):
    code = (
        "def f():\n"
        "    import logging, sys\n"
        "    print('to stdout')\n"
        "    sys.stderr.write('to stderr\\n')\n"
        "    logging.getLogger('user.code').warning('a warning')\n"
        "    return 1\n"
    )
    response = worker.execute(wire.function(code, "f"))
    assert response.stdout == "to stdout\nto stderr\nWARNING user.code: a warning\n"


def test_flashrt_own_log_records_are_not_captured(worker, wire):
    code = (
        "def f():\n"
        "    import logging\n"
        "    logging.getLogger('flashrt.something').warning('internal')\n"
        "    print('user')\n"
    )
    assert worker.execute(wire.function(code, "f")).stdout == "user\n"


def test_output_is_bounded_with_a_truncation_marker(make_worker, wire):
    worker = make_worker(max_output_bytes=200)
    code = "def f():\n    for i in range(100):\n        print('x' * 20)\n    return 'done'\n"
    response = worker.execute(wire.function(code, "f"))
    assert wire.dec(response) == "done"
    marker = TRUNCATION_MARKER.format(limit=200)
    assert response.stdout.endswith(marker)
    assert len(response.stdout) == 200 + len(marker)
    assert "after 200 characters" in response.stdout


def test_output_of_a_thread_the_user_starts_is_captured(worker, wire):
    code = (
        "def f():\n"
        "    import threading, logging\n"
        "    def work():\n"
        "        print('from my thread')\n"
        "        logging.getLogger('user').error('logged from my thread')\n"
        "    t = threading.Thread(target=work)\n"
        "    t.start()\n"
        "    t.join()\n"
    )
    assert worker.execute(wire.function(code, "f")).stdout == (
        "from my thread\nERROR user: logged from my thread\n"
    )


def test_output_after_the_request_ended_goes_to_the_real_stream_not_the_next_response(
    capfd, make_worker, wire, monkeypatch
):
    # A block-buffered stdout, as a worker has unless PYTHONUNBUFFERED is set: still shown.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    worker = make_worker()  # after capfd: an executor process inherits the captured fds
    starts_late_printer = (
        "def a():\n"
        "    import threading, time\n"
        "    def late():\n"
        "        time.sleep(0.2)\n"
        "        print('late output of a')\n"
        "    threading.Thread(target=late, daemon=True).start()\n"
        "    return 'a'\n"
    )
    waits = "async def b():\n    import asyncio\n    await asyncio.sleep(0.5)\n    print('b')\n"

    async def scenario():
        first = await worker.rt.execute(wire.function(starts_late_printer, "a"))
        second = await worker.rt.execute(wire.function(waits, "b"))
        return first, second

    first, second = worker.run(scenario())
    assert first.stdout == ""
    assert second.stdout == "b\n"
    assert "late output of a" in capfd.readouterr().out


def test_a_failed_requests_log_does_not_leak_into_the_next(worker, wire):
    failing = (
        "def f():\n"
        "    import logging\n"
        "    logging.getLogger('user').error('token=SECRET')\n"
        "    raise RuntimeError('failed')\n"
    )
    first = worker.execute(wire.function(failing, "f"))
    second = worker.execute(wire.function("def g():\n    print('clean')\n", "g"))
    assert "token=SECRET" in first.stdout
    assert second.stdout == "clean\n"


def test_background_work_is_never_captured(worker, capfd):
    async def scenario():
        buf = OutputBuffer(1000)
        token = capture.use_buffer(buf)
        capture.activate()
        try:

            async def noisy():
                print("background output")

            await worker.rt.background(noisy())
        finally:
            capture.deactivate()
            capture.reset_buffer(token)
        return buf.getvalue()

    assert worker.run(scenario()) == ""
    assert "background output" in capfd.readouterr().out


def test_log_records_outside_requests_are_not_captured(worker, wire, caplog):
    async def scenario():
        async def request():
            return await worker.rt.execute(
                wire.function(
                    "async def f():\n    import asyncio\n    await asyncio.sleep(0.05)\n", "f"
                )
            )

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        logging.getLogger("outside").warning("not part of any request")
        return await task

    with caplog.at_level(logging.WARNING):
        response = worker.run(scenario())
    assert response.stdout == ""
    assert "not part of any request" in caplog.text
