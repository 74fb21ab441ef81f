"""The supervisor ⇄ executor channel: length-prefixed msgspec msgpack frames over a socketpair.

One frame is a 4-byte big-endian length and a msgpack body, a tagged :class:`msgspec.Struct`.
Every frame about a request carries its id, so many requests share the one socket. Request and
response bodies travel as opaque bytes: the transport's JSON goes through untouched and is parsed
once, by the executor.

Sending is thread-safe and synchronous (user threads stream output from wherever they run), and
waits with ``poll`` when the socket buffer is full, so it never depends on an event loop: code
that closed the loop's file descriptors still gets its result back.

A request or answer body of :data:`OUT_OF_BAND_MIN` bytes or more does not go through the socket:
it goes in a memfd (:mod:`flashrt_core.outofband`) whose descriptor travels with its frame
(``SCM_RIGHTS``), and the frame says its size (``oob``). On a unix stream socket a read never
goes past bytes that carried descriptors, so a frame's descriptor always arrives no later than
the frame's last byte: received descriptors wait in order (:attr:`Channel.received`) and each
frame that declares an out-of-band body takes the next one. The supervisor ⇄ zygote frames are
:mod:`flashrt_core.zygote_frames`.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import select
import socket
import struct
import threading
from typing import Any

import msgspec

from . import outofband
from .outofband import OUT_OF_BAND_MIN, ChannelError

__all__ = [
    "EXECUTOR_TAG_ENV",
    "OUT_OF_BAND_MIN",
    "Cancel",
    "Channel",
    "ChannelError",
    "Execute",
    "Exiting",
    "Frame",
    "FrameReader",
    "Hello",
    "Imported",
    "Output",
    "Phase",
    "Preload",
    "Result",
    "RunDeployed",
    "Settled",
    "Setup",
    "StreamItem",
]

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 31
_READ_SIZE = 1 << 16
#: Room for the descriptors one read can bring (one per out-of-band frame; a read stops after
#: the first bytes that carried any).
_ANCILLARY_SIZE = socket.CMSG_SPACE(16 * array.array("i").itemsize)

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
    (``"msgpack"``) or of a ``FunctionRequest`` (``"request"``, decoded straight to one).

    An out-of-band body (``oob``: its size) arrives as a read-only ``memoryview`` of its
    mapping, unmapped when the last reference to it goes. ``note`` goes before the response's
    ``stdout`` (a retried request says so), so the answer's JSON is made once, there."""

    id: int
    body: bytes
    form: str = "json"
    request_id: str | None = None
    oob: int = 0
    note: str | None = None


class RunDeployed(msgspec.Struct, tag=True):
    """Run the deployed QB handler on one plain-JSON job (``job`` is its JSON). With
    ``stream``, a generator's items go back one ``StreamItem`` each as they are yielded (each
    at most ``max_item_bytes``), else they are gathered into the output."""

    id: int
    job: bytes
    request_id: str | None = None
    stream: bool = False
    max_item_bytes: int | None = None
    oob: int = 0


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
    """A request's answer: the FunctionResponse's JSON as the client reads it (made once, in the
    executor; the worker hands these bytes to its transport), or msgpack of a deployed
    handler's output."""

    id: int
    body: bytes
    installed: bool = False
    instance_id: str | None = None
    exiting: str | None = None  # the executor exits after this answer, and why
    oob: int = 0
    #: A deployed handler that yielded: how many items went as ``StreamItem`` frames before
    #: this answer (``body`` is then empty), and why the stream ended early, if it did.
    streamed: int | None = None
    stream_error: str | None = None


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


def encode(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _HEADER.pack(len(body)) + body


def _out_of_band(frame: Frame) -> tuple[Frame, int | None]:
    """``frame`` with a large body moved to a memfd, and the memfd (``None``: not moved)."""
    if isinstance(frame, (Execute, Result)) and len(frame.body) >= OUT_OF_BAND_MIN:
        fd = outofband.into_memfd(frame.body)
        return msgspec.structs.replace(frame, body=b"", oob=len(frame.body)), fd
    if isinstance(frame, RunDeployed) and len(frame.job) >= OUT_OF_BAND_MIN:
        fd = outofband.into_memfd(frame.job)
        return msgspec.structs.replace(frame, job=b"", oob=len(frame.job)), fd
    return frame, None


def _take_body(frame: Execute | Result | RunDeployed, received: collections.deque[int]) -> None:
    """Attach the out-of-band body ``frame`` declares: a request's as a read-only mapping (the
    executor decodes from it), an answer's as the one ``bytes`` the worker hands on."""
    if not received:
        raise ChannelError("a frame's out-of-band body arrived without its descriptor")
    fd = received.popleft()
    try:
        if isinstance(frame, Result):
            frame.body = outofband.read(fd, frame.oob)
        elif isinstance(frame, Execute):
            frame.body = outofband.mapped(fd, frame.oob)  # type: ignore[assignment]
        else:
            frame.job = outofband.mapped(fd, frame.oob)  # type: ignore[assignment]
    finally:
        os.close(fd)


_OUT_OF_BAND = (Execute, Result, RunDeployed)


class FrameReader:
    """Turns the bytes read from the socket into frames (a frame may arrive in pieces).

    ``received``: the channel's received descriptors, which out-of-band bodies take in order.
    """

    __slots__ = ("_buf", "_received")

    def __init__(self, received: collections.deque[int] | None = None) -> None:
        self._buf = bytearray()
        self._received: collections.deque[int] = (
            received if received is not None else collections.deque()
        )

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
            frame: Frame = _decoder.decode(memoryview(buf)[start : start + size])
            if isinstance(frame, _OUT_OF_BAND) and frame.oob:
                _take_body(frame, self._received)
            frames.append(frame)
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
        #: Descriptors received and not yet taken by their frames (see :class:`FrameReader`).
        self.received: collections.deque[int] = collections.deque()

    def send(self, frame: Frame) -> None:
        """Send one frame whole (after what was posted); raises ``OSError`` when the other
        end is gone."""
        frame, fd = _out_of_band(frame)
        data = encode(frame)
        if self._posted:
            with self._lock:
                data = b"".join([*self._posted, data])
                self._posted.clear()
        if fd is None:
            self.send_bytes(data)
            return
        try:  # the kernel holds the file while it is in flight: ours closes now
            self.send_bytes(data, fd)
        finally:
            os.close(fd)

    def post(self, frame: Frame) -> bool:
        """Queue ``frame`` for the next :meth:`flush` (or send): frames posted together leave
        in one write, which wakes the other end once. ``True`` when it is the first queued (the
        caller arranges the flush). A frame with an out-of-band body leaves at once."""
        if isinstance(frame, (Execute, RunDeployed)) and (
            len(frame.body if isinstance(frame, Execute) else frame.job) >= OUT_OF_BAND_MIN
        ):
            self.send(frame)
            return False
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

    def send_bytes(self, data: bytes, fd: int | None = None) -> None:
        """Write ``data`` whole; ``fd`` travels with its first bytes."""
        view = memoryview(data)
        with self._lock:
            try:
                while view:
                    try:
                        if fd is None:
                            sent = os.write(self.fd, view)
                        else:
                            rights = array.array("i", [fd])
                            sent = self.sock.sendmsg(
                                [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                            )
                            fd = None
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
        # recvmsg, never read(): a read would drop the descriptors that came with the bytes.
        data, ancillary, flags, _ = self.sock.recvmsg(
            _READ_SIZE, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.received.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ChannelError("descriptors sent over the channel were lost")
        return data

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()
        while self.received:  # bodies whose frames never came whole
            with contextlib.suppress(OSError):
                os.close(self.received.popleft())
