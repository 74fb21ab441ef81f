"""Errors that carry the pipeline stage they happened in."""

from __future__ import annotations

__all__ = ["STAGES", "StageError"]

#: The stages a failure is attributed to, in pipeline order.
STAGES = ("decode", "dependencies", "load code", "call", "encode result")


class StageError(Exception):
    """A failure blamed on one stage; ``__cause__`` (if any) holds the original exception."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
