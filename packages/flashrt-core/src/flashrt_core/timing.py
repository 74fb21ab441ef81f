"""Where a request's time went: each pipeline stage timed, and one INFO line per request.

The line is written after the answer has left (by whoever sends it), so the caller never waits
for it; ``FLASHRT_TIMING_LOG=0`` turns it off.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import FunctionRequest, FunctionResponse

__all__ = ["Timings", "Untimed", "timings_for"]

log = logging.getLogger("flashrt.timing")

#: Stages shorter than this are left out of the line: it names where the time went.
_NOTABLE_S = 0.0001
_clock = time.perf_counter


class Timings:
    """Seconds spent per stage of one request, from its arrival."""

    __slots__ = ("_mark", "failed", "request", "request_id", "stages", "started")

    #: Whether laps are measured (a stand-in's are not: callers may skip their clock reads).
    timed = True

    def __init__(self) -> None:
        self.started = self._mark = _clock()
        self.stages: dict[str, float] = {}
        #: What ran (named in the line), and the stage it failed in, if it did.
        self.request: FunctionRequest | None = None
        self.failed: str | None = None
        #: The request id, read where the request runs (the line may be written elsewhere).
        self.request_id: str | None = None

    def lap(self, stage: str) -> None:
        """The time since the last lap was spent in ``stage``."""
        now = _clock()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._mark
        self._mark = now

    def moved(self, stage: str, seconds: float) -> None:
        """``seconds`` already counted elsewhere belong to ``stage`` (code loads inside a call)."""
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    @property
    def what(self) -> str:
        """``function add``, ``class Adder.add``, or ``request`` before it was decoded."""
        request = self.request
        if request is None:
            return "request"
        if request.execution_type == "class":
            return f"class {request.class_name}.{request.method_name}"
        return f"function {request.function_name}"

    def line(self, response: FunctionResponse) -> str:
        total = _clock() - self.started
        if "load" in self.stages and "call" in self.stages:
            self.stages["call"] = max(0.0, self.stages["call"] - self.stages["load"])
        if response.success:
            outcome = "ok"
        else:
            outcome = f"failed during {self.failed}" if self.failed else "failed"
        parts = [
            f"{name} {seconds * 1e3:.2f} ms"
            for name, seconds in self.stages.items()
            if seconds >= _NOTABLE_S
        ]
        detail = f" ({', '.join(parts)})" if parts else ""
        return f"{self.what}: {outcome} in {total * 1e3:.2f} ms{detail}"

    def log(self, response: FunctionResponse) -> None:
        if log.isEnabledFor(logging.INFO):
            # The id the line is about, on the record: the worker's format shows it as [id].
            log.info("%s", self.line(response), extra={"request_id": self.request_id})


class Untimed(Timings):
    """A request whose line nobody will read (turned off, or INFO not shown): laps cost
    nothing."""

    __slots__ = ()
    timed = False

    def __init__(self) -> None:
        self.request = None
        self.failed = None
        self.request_id = None

    def lap(self, stage: str) -> None:
        pass

    def moved(self, stage: str, seconds: float) -> None:
        pass

    def log(self, response: FunctionResponse) -> None:
        pass


def timings_for(timing_log: bool) -> Timings:
    """Timings for one request: real ones only when its line will be written."""
    if timing_log and log.isEnabledFor(logging.INFO):
        return Timings()
    return Untimed()
