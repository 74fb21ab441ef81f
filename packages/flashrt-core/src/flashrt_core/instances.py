"""The process-wide registry of live class instances, bounded by count and idle time."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .locks import KeyedLocks

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["InstanceEntry", "InstanceRegistry"]

log = logging.getLogger("flashrt.instances")


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat()


class InstanceEntry:
    """One live instance and what the client is told about it."""

    __slots__ = (
        "class_name",
        "created_at",
        "instance",
        "last_used",
        "last_used_mono",
        "method_calls",
    )

    def __init__(self, instance: Any, class_name: str) -> None:
        self.instance = instance
        self.class_name = class_name
        self.created_at = _utcnow()
        self.last_used = self.created_at
        self.last_used_mono = time.monotonic()
        self.method_calls = 0

    def record_call(self) -> None:
        self.method_calls += 1
        self.last_used = _utcnow()
        self.last_used_mono = time.monotonic()

    def info(self) -> dict[str, Any]:
        return {
            "class_name": self.class_name,
            "created_at": self.created_at,
            "method_calls": self.method_calls,
            "last_used": self.last_used,
        }


class InstanceRegistry:
    """Instances keyed by ``instance_id``; least recently used and idle ones are evicted.

    Creation is single-flight per id: concurrent first calls on one id build one instance. The
    build's lock is an asyncio lock: take it on one event loop only (the process's). The entries
    themselves may be read from any thread.
    """

    def __init__(self, max_instances: int, idle_ttl_s: float) -> None:
        self.max_instances = max(1, max_instances)
        self.idle_ttl_s = idle_ttl_s
        self._entries: OrderedDict[str, InstanceEntry] = OrderedDict()
        self._entries_lock = threading.Lock()
        self._locks = KeyedLocks()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._entries

    def get(self, instance_id: str) -> InstanceEntry | None:
        return self._entries.get(instance_id)

    async def get_or_create(
        self,
        instance_id: str,
        factory: Callable[[], Awaitable[Any]],
        *,
        class_name: str,
        replace: bool = False,
    ) -> InstanceEntry:
        """Return the live instance for ``instance_id``, building it with ``factory`` if needed.

        An existing instance of another class under the same id is replaced, as is any instance
        when ``replace`` is true.
        """
        entry = self.live(instance_id, class_name)  # evicts idle ones too
        if entry is not None and not replace:
            return entry
        async with self._locks.hold((instance_id,)):
            # Someone may have built it while we waited for the lock.
            if not replace and (entry := self.live(instance_id, class_name)) is not None:
                return entry
            entry = InstanceEntry(await factory(), class_name)
            with self._entries_lock:
                self._entries[instance_id] = entry
                self._evict_over_count()
        return entry

    def live(self, instance_id: str, class_name: str) -> InstanceEntry | None:
        """The live instance of ``class_name`` under ``instance_id``, if there is one (no lock
        to wait for: a hit needs no event loop)."""
        with self._entries_lock:
            self._evict_idle()
            entry = self._entries.get(instance_id)
            if entry is None or entry.class_name != class_name:
                return None
            self._entries.move_to_end(instance_id)
            return entry

    def remove(self, instance_id: str) -> bool:
        """Forget an instance; ``False`` if there was none."""
        with self._entries_lock:
            return self._entries.pop(instance_id, None) is not None

    def _evict_idle(self) -> None:
        if not self._entries:
            return
        cutoff = time.monotonic() - self.idle_ttl_s
        for key in [k for k, e in self._entries.items() if e.last_used_mono < cutoff]:
            entry = self._entries.pop(key)
            log.info(
                "evicted idle instance %s (%s) after %.0f s", key, entry.class_name, self.idle_ttl_s
            )

    def _evict_over_count(self) -> None:
        while len(self._entries) > self.max_instances:
            key, entry = self._entries.popitem(last=False)
            log.info(
                "evicted instance %s (%s): over the limit of %d",
                key,
                entry.class_name,
                self.max_instances,
            )
