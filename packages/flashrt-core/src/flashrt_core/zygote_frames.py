"""The supervisor ⇄ zygote frames: one msgpack frame per ``SOCK_SEQPACKET`` message, no length
prefix. ``Setup``, ``Preload`` and ``Hello`` are the executor channel's own frames; ``Fork``
carries an executor's end of its channel as an attached descriptor.
"""

from __future__ import annotations

import msgspec

from .channel import Hello, Preload, Setup

__all__ = ["Fork", "Forked", "Reaped", "ZygoteFrame", "decode_zygote", "encode_zygote"]


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

_encoder = msgspec.msgpack.Encoder()
_zygote_decoder = msgspec.msgpack.Decoder(ZygoteFrame)


def encode_zygote(frame: ZygoteFrame) -> bytes:
    return _encoder.encode(frame)


def decode_zygote(data: bytes) -> ZygoteFrame:
    frame: ZygoteFrame = _zygote_decoder.decode(data)
    return frame
