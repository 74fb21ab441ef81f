"""The supervisor ⇄ executor channel: length-prefixed msgspec msgpack frames over a socketpair.

One frame is a 4-byte big-endian length and a msgpack body, a tagged :class:`msgspec.Struct`.
Every frame about a request carries its id, so many requests share the one socket. Request and
response bodies travel as opaque bytes: the transport's JSON goes through untouched and is parsed
once, by the executor.

Sending is thread-safe and synchronous (user threads stream output from wherever they run), and
waits with ``poll`` when the socket buffer is full, so it never depends on an event loop: code
that closed the loop's file descriptors still gets its result back.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import socket

__all__ = [
    "EXECUTOR_TAG_ENV",
    "Cancel",
    "Channel",
    "Execute",
    "Exiting",
    "Fork",
    "Forked",
    "Frame",
    "FrameReader",
    "Hello",
    "Imported",
    "Output",
    "Phase",
    "Preload",
    "Reaped",
    "Result",
    "RunDeployed",
    "Settled",
    "Setup",
    "StreamItem",
    "ZygoteFrame",
    "decode_zygote",
    "encode_zygote",
]

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 31
_READ_SIZE = 1 << 16


# --- supervisor → executor ---------------------------------------------------------------------


class Setup(msgspec.Struct, tag=True):
    """Sent once after spawn: the supervisor's settings, import path and start-up hand-over."""

    settings: dict[str, Any]
    sys_path: list[str]
    plugins: list[bytes] = []  # cloudpickled plugins registered in code
    app_dir: str | None = None  # the unpacked deployed app, when start-up made one
    deployed_handler: str | None = None  # resource whose generated QB handler to load
    #: The worker's levels of flashrt's loggers ("": the package's), which the executor takes.
    log_levels: dict[str, int] = {}


class Execute(msgspec.Struct, tag=True):
    """Run one request; ``body`` is JSON (``form="json"``), msgpack of a mapping
    (``"msgpack"``) or of a ``FunctionRequest`` (``"request"``, decoded straight to one)."""

    id: int
    body: bytes
    form: str = "json"
    request_id: str | None = None


class RunDeployed(msgspec.Struct, tag=True):
    """Run the deployed QB handler on one plain-JSON job (``job`` is its JSON). With
    ``stream``, a generator's items go back one ``StreamItem`` each as they are yielded (each
    at most ``max_item_bytes``), else they are gathered into the output."""

    id: int
    job: bytes
    request_id: str | None = None
    stream: bool = False
    max_item_bytes: int | None = None


class Cancel(msgspec.Struct, tag=True):
    """The supervisor gave up on a request (cancelled or timed out): stop what can be stopped."""

    id: int


class Preload(msgspec.Struct, tag=True):
    """Import these top-level modules ahead of need (a spare executor, or the zygote before it
    forks), so a fresh executor does not pay the user's imports again. ``modules`` maps each
    name to the origin it had where it was imported; one that resolves elsewhere is skipped."""

    modules: dict[str, str]


# --- executor → supervisor ---------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True):
    """First frame of a fresh executor: it imported what it needs and read the Setup."""

    pid: int
    error: str | None = None  # start-up failed in the executor; the reason
    installed: bool = False  # its start-up installed something (the caches are to persist)


class Output(msgspec.Struct, tag=True):
    """Text a request wrote, as it wrote it (1: stdout, 2: stderr)."""

    id: int
    stream: int
    text: str


class StreamItem(msgspec.Struct, tag=True):
    """One item a deployed generator yielded (its JSON), sent as it is yielded; the request's
    ``Result`` follows its last item."""

    id: int
    data: bytes


class Phase(msgspec.Struct, tag=True):
    """A request entered a stage the time limit does not cover (installs), or left it."""

    id: int
    name: str


class Result(msgspec.Struct, tag=True):
    """A request's answer: msgpack of the FunctionResponse, or of a deployed handler's output."""

    id: int
    body: bytes
    installed: bool = False
    instance_id: str | None = None
    exiting: str | None = None  # the executor exits after this answer, and why


class Settled(msgspec.Struct, tag=True):
    """Everything a cancelled request started has ended (its threads included)."""

    id: int


class Exiting(msgspec.Struct, tag=True):
    """The executor is about to exit on purpose (poisoned, or a CUDA context lost)."""

    reason: str


class Imported(msgspec.Struct, tag=True):
    """Top-level modules user code imported since the last report (not flashrt's own), each
    with its origin (a file, or ``built-in``): the next executor imports them in advance."""

    modules: dict[str, str]


Frame = (
    Setup
    | Execute
    | RunDeployed
    | Cancel
    | Preload
    | Hello
    | Output
    | StreamItem
    | Phase
    | Result
    | Settled
    | Exiting
    | Imported
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)

#: The environment variable naming the executor a process descends from: set in each executor,
#: so what its code starts (a subprocess, even in a session of its own) can be found and ended
#: with it.
EXECUTOR_TAG_ENV = "FLASHRT_EXECUTOR_TAG"


# --- supervisor ⇄ zygote (one frame per SOCK_SEQPACKET message, no length prefix) --------------


class Fork(msgspec.Struct, tag=True):
    """Fork an executor; its end of the channel travels with the message."""

    tag: str


class Forked(msgspec.Struct, tag=True):
    """The executor forked for the last ``Fork`` (``pid`` 0 and ``error`` when it failed)."""

    pid: int
    error: str | None = None


class Reaped(msgspec.Struct, tag=True):
    """A child of the zygote ended (an executor, or an orphan it adopted), as
    :attr:`subprocess.Popen.returncode` would say it."""

    pid: int
    returncode: int


ZygoteFrame = Setup | Preload | Fork | Hello | Forked | Reaped

_zygote_decoder = msgspec.msgpack.Decoder(ZygoteFrame)


def encode_zygote(frame: ZygoteFrame) -> bytes:
    return _encoder.encode(frame)


def decode_zygote(data: bytes) -> ZygoteFrame:
    frame: ZygoteFrame = _zygote_decoder.decode(data)
    return frame


def encode(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Turns the bytes read from the socket into frames (a frame may arrive in pieces)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        offset = 0
        end = len(buf)
        while end - offset >= 4:
            (size,) = _HEADER.unpack_from(buf, offset)
            if end - offset - 4 < size:
                break
            start = offset + 4
            frames.append(_decoder.decode(memoryview(buf)[start : start + size]))
            offset = start + size
        if offset:
            del buf[:offset]
        return frames


class Channel:
    """One end of the socketpair. ``send`` may be called from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self._lock = threading.Lock()
        self.broken = False
        self._posted: list[bytes] = []

    def send(self, frame: Frame) -> None:
        """Send one frame whole (after what was posted); raises ``OSError`` when the other
        end is gone."""
        data = encode(frame)
        if self._posted:
            with self._lock:
                data = b"".join([*self._posted, data])
                self._posted.clear()
        self.send_bytes(data)

    def post(self, frame: Frame) -> bool:
        """Queue ``frame`` for the next :meth:`flush` (or send): frames posted together leave
        in one write, which wakes the other end once. ``True`` when it is the first queued (the
        caller arranges the flush)."""
        with self._lock:
            self._posted.append(encode(frame))
            return len(self._posted) == 1

    def flush(self) -> None:
        """Send what was posted; raises ``OSError`` when the other end is gone."""
        with self._lock:
            data = b"".join(self._posted)
            self._posted.clear()
        if data:
            self.send_bytes(data)

    def send_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            try:
                while view:
                    try:
                        sent = os.write(self.fd, view)
                    except BlockingIOError:
                        poller = select.poll()
                        poller.register(self.fd, select.POLLOUT)
                        poller.poll(1000)
                        continue
                    view = view[sent:]
            except OSError:
                self.broken = True
                raise

    def recv_available(self) -> bytes:
        """What the socket holds now (``b""`` at EOF); ``BlockingIOError`` when nothing yet."""
        # 64 KiB: under malloc's mmap threshold, so a read is a heap allocation rather than an
        # mmap, mremap and munmap each (a forked executor paid two page faults a request).
        return os.read(self.fd, _READ_SIZE)

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()
