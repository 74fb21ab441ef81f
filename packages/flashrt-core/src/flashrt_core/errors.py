"""Errors that carry the pipeline stage they happened in."""

from __future__ import annotations

__all__ = ["CALLER_GONE", "STAGES", "StageError"]

#: The message a shell cancels a request's task with when its caller went away (an HTTP client
#: that disconnected): the request's code is cancelled, but a sync call, which cannot be, is left
#: to finish (its result dropped) rather than have its executor recycled under the requests of
#: other callers.
CALLER_GONE = "the caller went away"

#: The stages a failure is attributed to, in pipeline order.
STAGES = ("decode", "dependencies", "load code", "call", "encode result")


class StageError(Exception):
    """A failure blamed on one stage; ``__cause__`` (if any) holds the original exception."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
