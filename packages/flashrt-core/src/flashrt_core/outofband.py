"""Large frame bodies out of band: an anonymous, sealed ``memfd_create`` file per body, whose
descriptor travels with its frame (:mod:`flashrt_core.channel`).

Why a memfd: it has no name, so whichever process dies mid-transfer, the kernel frees the file
with its last descriptor or mapping, and nothing is left to clean up. The executor maps a
request's file read-only and decodes straight from the mapping; the worker reads an answer's
file into the one ``bytes`` it hands to the transport.
"""

from __future__ import annotations

import contextlib
import mmap
import os

__all__ = ["OUT_OF_BAND_MIN", "ChannelError", "into_memfd", "mapped", "read"]

#: Bodies this large or larger cross out of band: below it, a copy through the socket costs less
#: than making, filling and mapping a file.
OUT_OF_BAND_MIN = 1 << 20


class ChannelError(OSError):
    """The channel's bytes make no sense (an out-of-band body without its descriptor, or short
    of its size): that end is of no use any more."""


def into_memfd(body: bytes) -> int:
    """An anonymous file holding ``body``, sealed: the receiver reads what was written."""
    import fcntl

    fd = os.memfd_create("flashrt-body", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        with contextlib.suppress(OSError):  # a kernel without seals: the file is ours alone
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(fd: int, size: int) -> None:
    have = os.fstat(fd).st_size
    if have < size:
        raise ChannelError(f"an out-of-band body is short: {have} of its {size} bytes")


def read(fd: int, size: int) -> bytes:
    """The body, copied once into the ``bytes`` its reader hands on."""
    _check(fd, size)
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise ChannelError(f"an out-of-band body read short: {len(data)} of {size} bytes")
    return data


def mapped(fd: int, size: int) -> memoryview:
    """The body as a read-only mapping (the descriptor may be closed afterwards)."""
    _check(fd, size)
    # Populated at once: faulting its pages in one by one while decoding costs twice the
    # decoding itself.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ))
