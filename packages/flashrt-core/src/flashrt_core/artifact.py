"""Unpack a deployed app's ``flash build`` artifact, safely, with a bounded wait.

The reference worker blocked boot for about 90 s on a missing artifact, then crashed, and set
its "unpacked" flag before success so later calls silently did nothing (docs/contracts.md,
defect 10). Here:

* :class:`ArtifactUnpacker` retries with back-off while the artifact has not appeared yet (or is
  still being written: unreadable, and its size or mtime changed within the last second), within
  one total bound, then reports ``failed`` with the reason instead of raising;
* the outcome is recorded only once it is true (``pending`` -> ``ready`` | ``failed``); a failed
  outcome does not stick: a later :meth:`~ArtifactUnpacker.unpack` tries again;
* extraction goes through :mod:`flashrt_core.safetar` into a fresh directory swapped in whole;
* the app directory is its own directory, put on ``sys.path`` after the standard library, so a
  user's ``logger.py`` or ``json.py`` shadows neither flashrt nor the stdlib.

Everything here is blocking: call it through ``Runtime.run_blocking``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .safetar import ArchiveError, CorruptArchiveError, ExtractLimits, extract_replace

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "ArtifactError",
    "ArtifactOutcome",
    "ArtifactUnpacker",
    "add_app_dir_to_sys_path",
    "get_unpacker",
]

logger = logging.getLogger("flashrt.artifact")

Status = Literal["ready", "failed", "pending"]


class ArtifactError(RuntimeError):
    """The artifact could not be unpacked; the message is the outcome's reason."""


@dataclasses.dataclass(frozen=True)
class ArtifactOutcome:
    """Where unpacking stands: what the shells report while booting and on ``/ping``.

    In deployed mode the plugins' context holds one (``PluginContext.artifact``).
    """

    status: Status
    reason: str | None = None
    app_dir: Path | None = None
    artifact: Path | None = None
    attempts: int = 0
    elapsed_s: float = 0.0

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "app_dir": None if self.app_dir is None else str(self.app_dir),
            "artifact": None if self.artifact is None else str(self.artifact),
            "attempts": self.attempts,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class ArtifactUnpacker:
    """Unpacks one artifact into one directory: idempotent, thread-safe, bounded."""

    def __init__(
        self,
        artifact: Path,
        app_dir: Path,
        *,
        wait_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        limits: ExtractLimits | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.artifact = Path(artifact)
        self.app_dir = Path(app_dir).absolute()
        self.wait_s = wait_s
        self.backoff_s = max(backoff_s, 0.01)
        self.max_backoff_s = max(max_backoff_s, self.backoff_s)
        self.limits = limits or ExtractLimits(max_members=200_000, max_bytes=8 * 1024**3)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._outcome = ArtifactOutcome(status="pending", artifact=self.artifact)

    @property
    def outcome(self) -> ArtifactOutcome:
        """The latest outcome; ``pending`` until an unpack finished."""
        return self._outcome

    def unpack(self) -> ArtifactOutcome:
        """Unpack (once) and return the outcome; never raises for a bad or missing artifact.

        Concurrent callers wait for the one unpack in progress and share its outcome. After a
        ``failed`` outcome the next call starts a new bounded attempt.
        """
        with self._lock:
            if self._outcome.status == "ready":
                return self._outcome
            self._outcome = ArtifactOutcome(status="pending", artifact=self.artifact)
            self._outcome = self._unpack_with_retries()
            return self._outcome

    def _unpack_with_retries(self) -> ArtifactOutcome:
        started = time.monotonic()
        deadline = started + self.wait_s
        delay = self.backoff_s
        attempts = 0
        last_sig: tuple[int, int] | None = None
        sig_since = started
        settle_s = 1.0
        while True:
            attempts += 1
            sig = _signature(self.artifact)
            try:
                if sig is None:
                    raise FileNotFoundError(self.artifact)
                report = extract_replace(self.artifact, self.app_dir, self.limits)
            except FileNotFoundError:
                reason = (
                    f"artifact {str(self.artifact)!r} did not appear within {self.wait_s:g} s "
                    "(set FLASH_BUILD_ARTIFACT_PATH, or FLASH_DISABLE_UNPACK=1 for an image "
                    "with the app already unpacked)"
                )
            except CorruptArchiveError as exc:
                # A copy in progress looks truncated: retry while the file keeps changing, give
                # up once it has stayed the same (size and mtime) for ``settle_s``.
                if sig != last_sig:
                    last_sig, sig_since = sig, time.monotonic()
                elif time.monotonic() - sig_since >= settle_s:
                    return self._failed(str(exc), attempts, started)
                reason = str(exc)
            except ArchiveError as exc:  # unsafe or over a cap: retrying cannot help
                return self._failed(str(exc), attempts, started)
            except OSError as exc:
                return self._failed(
                    f"cannot unpack into {str(self.app_dir)!r}: {type(exc).__name__}: {exc}",
                    attempts,
                    started,
                )
            else:
                elapsed = time.monotonic() - started
                logger.info(
                    "artifact %s unpacked into %s: %d members, %d bytes, %d attempt(s), %.2f s",
                    self.artifact,
                    self.app_dir,
                    report.members,
                    report.bytes,
                    attempts,
                    elapsed,
                )
                return ArtifactOutcome(
                    status="ready",
                    app_dir=self.app_dir,
                    artifact=self.artifact,
                    attempts=attempts,
                    elapsed_s=elapsed,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._failed(reason, attempts, started)
            logger.info("artifact not ready (%s); retrying in %.2f s", reason, delay)
            self._sleep(min(delay, remaining))
            delay = min(delay * 2, self.max_backoff_s)

    def _failed(self, reason: str, attempts: int, started: float) -> ArtifactOutcome:
        logger.error("artifact unpack failed after %d attempt(s): %s", attempts, reason)
        return ArtifactOutcome(
            status="failed",
            reason=reason,
            artifact=self.artifact,
            attempts=attempts,
            elapsed_s=time.monotonic() - started,
        )


_unpackers: dict[tuple[Path, Path], ArtifactUnpacker] = {}
_unpackers_lock = threading.Lock()


def get_unpacker(artifact: Path, app_dir: Path, **options: Any) -> ArtifactUnpacker:
    """The process-wide unpacker for ``(artifact, app_dir)``: both shells share one outcome.

    ``options`` (the :class:`ArtifactUnpacker` keywords) apply when it is first created.
    """
    key = (Path(artifact).absolute(), Path(app_dir).absolute())
    with _unpackers_lock:
        unpacker = _unpackers.get(key)
        if unpacker is None:
            unpacker = _unpackers[key] = ArtifactUnpacker(key[0], key[1], **options)
        return unpacker


def add_app_dir_to_sys_path(app_dir: Path) -> None:
    """Make the app importable without letting it shadow the standard library.

    The directory goes just before the first ``site-packages`` entry: the artifact's bundled
    requirements win over the image's copies (that is what ``flash build`` bundled them for),
    while ``json.py`` or ``logging.py`` in the user's project cannot replace the stdlib.
    """
    entry = str(app_dir)
    if entry in sys.path:
        return
    index = next(
        (
            i
            for i, p in enumerate(sys.path)
            if p.rstrip("/").endswith(("site-packages", "dist-packages"))
        ),
        len(sys.path),
    )
    sys.path.insert(index, entry)
