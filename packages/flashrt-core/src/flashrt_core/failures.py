"""Failed responses: the message, the stage it failed in, and the user's part of the traceback."""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Any

from .errors import StageError
from .protocol import FunctionResponse

__all__ = ["failure_response", "stage_failure"]


@functools.cache
def _internal_dirs() -> tuple[str, ...]:
    """Directories whose frames are the runtime's plumbing, not the user's story."""
    stdlib = Path(functools.__file__).resolve().parent
    places = (Path(__file__).resolve().parent, stdlib / "asyncio", stdlib / "concurrent")
    return tuple(str(p) + os.sep for p in places)


def stage_failure(stage: str, message: str, stdout: str | None = None) -> FunctionResponse:
    """A failure with no exception to show: ``message``, then the stage it happened in."""
    return FunctionResponse(
        success=False, error=f"{message}\n[flashrt] failed during {stage}", stdout=stdout
    )


def failure_response(
    stage: str,
    exc: BaseException,
    tb: Any,
    *,
    message: str | None = None,
    cause: BaseException | None = None,
) -> FunctionResponse:
    text = message if message is not None else (str(exc) or type(exc).__name__)
    if not isinstance(exc, Exception) and message is None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    detail = f"{text}\n[flashrt] failed during {stage}"
    shown = cause if cause is not None else (None if isinstance(exc, StageError) else exc)
    if shown is not None:
        detail += f" ({type(shown).__name__})\n" + format_traceback(shown, tb)
    return FunctionResponse(success=False, error=detail.rstrip("\n"))


def format_traceback(exc: BaseException, tb: Any) -> str:
    """The traceback from the first frame that is not the runtime's own plumbing."""
    internal = _internal_dirs()
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(internal):
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return "".join(lines)
