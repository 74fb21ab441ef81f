"""The user's imports, carried to the next executor: what to report, and importing it in advance.

A fresh executor (after a crash, a poisoned request, a recycle) would otherwise pay every
import the user's code made again on its first request: seconds for ``torch``. The executor
reports the top-level modules user code imported (:class:`ImportReport`, an ``Imported``
frame); the supervisor hands them to the next one, or to the zygote that forks it, which
imports them ahead of need (:func:`preload`).

A leaf on purpose: the zygote imports it before anything else, and only the imports it asks
for may run there (no CUDA, no threads, no flashrt).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ImportReport", "preload"]

log = logging.getLogger("flashrt.carry")

#: Origins that are not files: found the same way in every interpreter of this installation.
_NOT_FILES = ("built-in", "frozen")


def preload(modules: Mapping[str, str]) -> list[str]:
    """Import each top-level module whose spec here has the origin it had where it was imported.

    A name that resolves to another file (or nowhere) is skipped: importing it could run a
    different module of the same name. Whatever an import raises, ``SystemExit`` and
    ``KeyboardInterrupt`` included, skips that one (logged at debug). Returns the names now
    imported with the origin asked for, those already imported included.
    """
    done: list[str] = []
    for name, origin in modules.items():
        if not name.isidentifier():
            log.debug("preload: %r is not a top-level module name; skipped", name)
            continue
        try:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin != origin:
                found = None if spec is None else spec.origin
                log.debug("preload: %s is at %r here, not %r; skipped", name, found, origin)
                continue
            importlib.import_module(name)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            log.debug("preload: importing %s raised %s: %s; skipped", name, type(exc).__name__, exc)
            continue
        done.append(name)
    return done


class ImportReport:
    """Which top-level modules user code imported that the next executor can import as well.

    Only a module whose origin is built-in, frozen, or a file under an entry the import path had
    when the executor became ready (``roots``: site-packages, the standard library, the deployed
    app): a request's ``modules`` mount, or a directory its code put on ``sys.path``, may hold
    another module of that name next time. Never one present at ready (``known``: flashrt's
    own), nor a name starting with ``_`` or ``flashrt``. Each is reported once per origin.
    """

    def __init__(self, roots: Sequence[str], known: Iterable[str]) -> None:
        # Strings, as the finders build origins (pathlib is an import the zygote need not pay).
        places = {
            os.path.abspath(entry or os.curdir) + os.sep  # noqa: PTH100
            for entry in roots
        }
        self._roots = tuple(sorted(places))
        self._known = frozenset(known)
        self._reported: dict[str, str] = {}
        self._lock = threading.Lock()  # both lanes report

    def expect(self, modules: Mapping[str, str]) -> None:
        """The supervisor knows these already (it sent them in a ``Preload``)."""
        with self._lock:
            self._reported.update(modules)

    def new(self, names: Iterable[str]) -> dict[str, str]:
        """Of ``names`` (modules that just appeared in ``sys.modules``), those to report."""
        found: dict[str, str] = {}
        for name in names:
            if "." in name or name.startswith(("_", "flashrt")) or name in self._known:
                continue
            origin = self._origin(name)
            if origin is not None:
                found[name] = origin
        if not found:
            return found
        with self._lock:
            found = {n: o for n, o in found.items() if self._reported.get(n) != o}
            self._reported.update(found)
        return found

    def _origin(self, name: str) -> str | None:
        try:
            origin = sys.modules[name].__spec__.origin  # type: ignore[union-attr]
        except Exception:  # gone again, not a module, no spec
            return None
        if not isinstance(origin, str):
            return None  # a namespace package: nothing to compare next time
        if origin in _NOT_FILES or origin.startswith(self._roots):
            return origin
        return None
