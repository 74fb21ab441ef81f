"""Named asyncio locks that exist only while someone holds or awaits them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """Locks by name, held in sorted order; a name's lock lives only while someone uses it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, names: Iterable[str]) -> AsyncIterator[None]:
        entries = []
        for name in sorted(names):
            entry = self._locks.setdefault(name, (asyncio.Lock(), [0]))
            entry[1][0] += 1
            entries.append((name, entry))
        held: list[asyncio.Lock] = []
        try:
            for _, (lock, _users) in entries:
                await lock.acquire()  # a cancellation here releases what is already held
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()
            for name, (_lock, users) in entries:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[name]

    def __len__(self) -> int:
        return len(self._locks)
