"""The worker process's own logging set-up, shared by the shells.

Embedders of flashrt-core keep their own logging: only a worker's entry point calls this.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["configure_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Root logging at ``FLASHRT_LOG_LEVEL``, one line per record on stderr."""
    logging.basicConfig(level=settings.log_level.upper(), format=FORMAT)
