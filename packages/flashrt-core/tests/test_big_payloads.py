"""Big payloads: request and answer bodies of megabytes cross the worker ⇄ executor boundary out
of band (a memfd whose descriptor travels with its frame), come back byte for byte, and leave
nothing behind when an executor dies in the middle of one.

Sizes are picked per path: 1 MiB (just at the threshold), 16 MiB and 64 MiB through the
isolated runtime; 16 MiB in process; JSON serialization at 16 MiB.
"""

from __future__ import annotations

import json
import os
import select
import socket
import string
import time
from pathlib import Path

import pytest
from flashrt_core import channel as ch
from flashrt_core.protocol import decode_response

MiB = 1 << 20
ECHO = "def echo(blob):\n    return blob\n"
STORE = (
    "class Store:\n    def put(self, blob):\n        self.blob = blob\n        return len(blob)\n"
    "    def get(self):\n        return self.blob\n"
)
#: Dies with status 3 once its (large) argument has crossed.
EXIT = "def exit_after(blob):\n    import os\n    os._exit(3)\n"
#: Returns a large result, and kills its executor (SIGKILL) the moment that answer's memfd
#: appears: the answer is being written out of band when it dies.
KILL_WHILE_ANSWERING = """
def big_then_killed(n):
    import os, signal, threading

    def killer():
        while True:
            for fd in os.listdir('/proc/self/fd'):
                try:
                    if 'memfd:flashrt-body' in os.readlink(f'/proc/self/fd/{fd}'):
                        os.kill(os.getpid(), signal.SIGKILL)
                except OSError:
                    pass

    threading.Thread(target=killer, daemon=True).start()
    return os.urandom(n)
"""
TALK_THEN_BIG = (
    "def talk(n):\n    import os\n"
    "    for i in range(5):\n        print(f'line {i}', flush=True)\n"
    "    return os.urandom(n)\n"
)


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


def executor_memfds(pid: int, seconds: float = 5.0) -> list[str]:
    """What a live executor still holds once its last answer has left: its own descriptor for
    that answer is closed just after the send returns, which may be after the worker read it."""
    deadline = time.monotonic() + seconds
    while (held := body_memfds(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return held


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize(
    ("isolation", "mib"), [("process", 1), ("process", 16), ("process", 64), ("none", 16)]
)
def test_large_arguments_and_results_come_back_equal(make_worker, wire, isolation, mib):
    worker = make_worker(isolation=isolation)
    blob = os.urandom(mib * MiB)
    response = worker.execute(wire.function(ECHO, "echo", blob))
    assert wire.dec(response) == blob
    # What a shell does: the transport's JSON in, the response's JSON out, never re-encoded.
    body = json.dumps(wire.function(ECHO, "echo", blob[::-1])).encode()
    answer = worker.run(worker.rt.execute_json(memoryview(body)))  # as the queue shell keeps it
    assert isinstance(answer, bytes)
    assert wire.dec(decode_response(answer)) == blob[::-1]
    assert body_memfds(os.getpid()) == []
    described = worker.rt.describe()
    for view in described.executors if described is not None else ():  # unmapped once decoded
        assert executor_memfds(view.pid) == []


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_large_json_arguments_and_results_come_back_equal(make_worker, wire, isolation):
    worker = make_worker(isolation=isolation)
    text = (string.ascii_letters * (16 * MiB // len(string.ascii_letters) + 1))[: 16 * MiB]
    response = worker.execute(wire.json_function(ECHO, "echo", text))
    assert response.success, response.error
    assert response.json_result == text


def test_a_class_method_with_a_large_argument_keeps_it(make_worker, wire):
    worker = make_worker(isolation="process")
    blob = os.urandom(16 * MiB)
    put = worker.execute(wire.method(STORE, "Store", "put", blob, instance_id="big"))
    assert wire.dec(put) == len(blob)
    got = worker.execute(wire.method(STORE, "Store", "get", instance_id="big"))
    assert wire.dec(got) == blob


def test_an_executor_that_dies_after_a_large_request_crossed_leaves_nothing(make_worker, wire):
    worker = make_worker(isolation="process")
    before = shm()
    response = worker.execute(wire.function(EXIT, "exit_after", os.urandom(64 * MiB)))
    assert not response.success
    assert "exited with status 3" in response.error
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", b"small"))) == b"small"
    assert body_memfds(os.getpid()) == []
    assert shm() == before


def test_an_executor_killed_while_writing_a_large_answer_leaves_nothing(make_worker, wire):
    worker = make_worker(isolation="process")
    before = shm()
    response = worker.execute(wire.function(KILL_WHILE_ANSWERING, "big_then_killed", 64 * MiB))
    assert not response.success
    assert "killed by SIGKILL" in response.error
    blob = os.urandom(2 * MiB)
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", blob))) == blob
    assert body_memfds(os.getpid()) == []
    for view in worker.rt.describe().executors:  # the live executors hold none either
        assert executor_memfds(view.pid) == []
    assert shm() == before


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_body_over_the_limit_and_a_truncated_one_are_refused_clearly(
    make_worker, wire, isolation
):
    worker = make_worker(isolation=isolation, max_request_bytes=8 * MiB)
    over = json.dumps(wire.function(ECHO, "echo", os.urandom(8 * MiB))).encode()
    refused = decode_response(worker.run(worker.rt.execute_json(over)))
    assert not refused.success
    assert "exceeds the limit of 8388608" in refused.error
    whole = json.dumps(wire.function(ECHO, "echo", os.urandom(3 * MiB))).encode()
    truncated = decode_response(worker.run(worker.rt.execute_json(whole[: len(whole) // 2])))
    assert not truncated.success
    assert "not valid JSON" in truncated.error
    assert "truncated" in truncated.error
    assert wire.dec(worker.execute(wire.function(ECHO, "echo", b"next"))) == b"next"


def test_live_output_of_a_request_with_a_large_result_arrives_once_in_order(
    make_worker, wire, capsys
):
    worker = make_worker(isolation="process")
    response = worker.execute(wire.function(TALK_THEN_BIG, "talk", 16 * MiB))
    assert len(wire.dec(response)) == 16 * MiB
    lines = [f"line {i}" for i in range(5)]
    assert response.stdout.splitlines() == lines
    assert capsys.readouterr().out.splitlines() == lines


def _frames(channel: ch.Channel, reader: ch.FrameReader) -> list[ch.Frame]:
    select.select([channel.fd], [], [], 5)
    return reader.feed(channel.recv_available())


def test_the_channel_matches_each_out_of_band_body_to_its_frame_and_refuses_a_broken_one():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = ch.Channel(ours), ch.Channel(theirs)
    reader = ch.FrameReader(receiver.received)
    try:
        first, second = os.urandom(2 * MiB), os.urandom(3 * MiB)
        sender.send(ch.Result(1, first))
        sender.send(ch.Output(1, 1, "between\n"))
        sender.send(ch.Result(2, second))
        frames: list[ch.Frame] = []
        while len(frames) < 3:
            frames += _frames(receiver, reader)
        assert [type(f).__name__ for f in frames] == ["Result", "Output", "Result"]
        assert frames[0].body == first and frames[2].body == second  # type: ignore[union-attr]
        assert not receiver.received and body_memfds(os.getpid()) == []
        # A body declared with no descriptor, and one shorter than it says: named, never read.
        sender.send_bytes(ch.encode(ch.Result(3, b"", oob=5)))
        with pytest.raises(ch.ChannelError, match="without its descriptor"):
            _frames(receiver, reader)
        short = os.memfd_create("short")
        os.write(short, b"abc")
        try:
            sender.send_bytes(ch.encode(ch.Result(4, b"", oob=10)), short)
        finally:
            os.close(short)
        with pytest.raises(ch.ChannelError, match="short: 3 of its 10 bytes"):
            ch.FrameReader(receiver.received).feed(_raw(receiver))
        assert body_memfds(os.getpid()) == []
    finally:
        sender.close()
        receiver.close()


def _raw(channel: ch.Channel) -> bytes:
    select.select([channel.fd], [], [], 5)
    return channel.recv_available()
