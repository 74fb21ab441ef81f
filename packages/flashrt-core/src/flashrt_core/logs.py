"""The worker process's own logging set-up, shared by the shells and the executor.

Embedders of flashrt-core keep their own logging: only a worker's entry point calls
:func:`configure_logging`. flashrt's own lines name the job or request they are about (the
``request_id`` context variable, set by the shells), so one request can be followed through the
container log; user code's lines are echoed as written, never tagged.
"""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .settings import Settings

__all__ = ["FORMAT", "configure_logging", "request_id"]

FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

#: The job or request being served in this context, for flashrt's own log lines.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashrt_request_id", default=None
)


class _RequestTag(logging.Filter):
    """Adds ``request_tag`` (`` [<id>]`` or nothing); drops user records a request captures."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("flashrt"):
            from .capture import current_buffer

            # The request's buffer (and its live echo) has it, in the form the user sees.
            if current_buffer() is not None:
                return False
        rid = getattr(record, "request_id", None) or request_id.get()
        record.request_tag = f" [{rid}]" if rid else ""
        return True


def configure_logging(settings: Settings, levels: Mapping[str, int] | None = None) -> None:
    """Root logging at ``FLASHRT_LOG_LEVEL``, one line per record on stderr.

    ``levels`` (an executor's: the worker's levels of flashrt's loggers, ``""`` for the root)
    take the setting's place.
    """
    levels = levels or {}
    logging.basicConfig(level=levels.get("", settings.log_level.upper()), format=FORMAT)
    for name, level in levels.items():
        if name:
            logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RequestTag) for f in handler.filters):
            handler.addFilter(_RequestTag())
