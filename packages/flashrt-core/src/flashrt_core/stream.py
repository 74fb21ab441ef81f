"""A deployed generator's items, handed to the caller as they are yielded.

A deployed QB function that yields (a token stream, progress frames) is a stream, not one
result: each item is encoded as JSON where the generator runs and handed to the caller's
``on_item`` at once, across the process boundary when the executor runs it (a ``StreamItem``
frame per item). The call then answers :class:`Streamed` (how many items went, and the error
that ended the stream early, if one did), so the caller can close the job the way the runpod
SDK closes a generator handler's job. This module is shared by both sides of that boundary
and imports nothing of flashrt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["END_MARK", "Streamed", "decode_end", "encode_end", "encode_item", "item_too_large"]

#: The first byte of a deployed ``Result`` body that ends a stream. msgpack never uses 0xc1, so
#: no plain output's body can start with it.
END_MARK = b"\xc1"


@dataclass(frozen=True, slots=True)
class Streamed:
    """The answer to a deployed job whose handler yielded: its items went to ``on_item``."""

    #: Items handed to ``on_item``.
    items: int
    #: Why the stream ended early (the generator raised, an item was refused), or ``None``.
    error: str | None = None


def encode_end(end: Streamed) -> bytes:
    """The ``Result`` body that carries ``end`` across the channel."""
    return END_MARK + json.dumps([end.items, end.error]).encode()


def decode_end(body: bytes) -> Streamed | None:
    """The :class:`Streamed` a ``Result`` body carries; ``None`` for a plain output's body."""
    if body[:1] != END_MARK:
        return None
    items, error = json.loads(body[1:])
    return Streamed(int(items), None if error is None else str(error))


def encode_item(item: Any) -> bytes:
    """An item as the SDK posts it (``json.dumps``, non-ASCII kept); raises ``TypeError`` or
    ``ValueError`` for one JSON cannot hold."""
    return json.dumps(item, ensure_ascii=False).encode()


def item_too_large(index: int, size: int, limit: int) -> str:
    """Why item ``index`` (from 1) is refused: its size and the limit, and what to do."""
    return (
        f"stream item {index} is {size / 1e6:.1f} MB ({size} bytes) as JSON, over the "
        f"platform's limit of {limit / 1e6:g} MB ({limit} bytes) for one item; the stream "
        "was stopped: yield a URL to stored data, or write large data to the network volume"
    )
