"""A deployed generator's items, handed to the caller as they are yielded.

A deployed QB function that yields (a token stream, progress frames) is a stream, not one
result: each item is encoded as JSON where the generator runs and handed to the caller's
``on_item`` at once, across the process boundary when the executor runs it (a ``StreamItem``
frame per item). The call then answers :class:`Streamed` (how many items went, and the error
that ended the stream early, if one did; across the boundary, in the ``Result`` frame's own
fields), so the caller can close the job the way the runpod SDK closes a generator handler's
job. This module is shared by both sides of that boundary and imports nothing of flashrt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Streamed", "encode_item", "item_too_large"]


@dataclass(frozen=True, slots=True)
class Streamed:
    """The answer to a deployed job whose handler yielded: its items went to ``on_item``."""

    #: Items handed to ``on_item``.
    items: int
    #: Why the stream ended early (the generator raised, an item was refused), or ``None``.
    error: str | None = None


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
