"""The timing line: one INFO line per request, with its id, its outcome and where its time went.

In an executor the line is written by the executor process on the worker's stderr (captured at
the descriptor here); in-process it is a log record of ``flashrt.timing``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from flashrt_core.logs import request_id

if TYPE_CHECKING:
    import pytest

NAP = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"


def _timing_lines(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, expect: int = 0
) -> list[str]:
    """Every timing line written, as ``[id] text`` whichever process wrote it.

    An executor writes its line just after answering: wait (bounded) for ``expect`` of them.
    The wait peeks at the captured descriptor (``pread`` moves no offset) and reads it out once:
    ``readouterr`` empties the capture file, and a line another process writes while it does is
    lost.
    """
    deadline = time.monotonic() + 5
    while expect and time.monotonic() < deadline:
        written = os.pread(2, 1 << 20, 0).decode(errors="replace")
        if written.count("flashrt.timing") >= expect:
            break
        time.sleep(0.02)
    lines = [line for line in capfd.readouterr().err.splitlines() if "flashrt.timing" in line]
    for record in caplog.records:
        if record.name == "flashrt.timing":
            lines.append(f"[{getattr(record, 'request_id', None)}] {record.getMessage()}")
    return lines


def _run(worker: Any, request: dict[str, Any], rid: str) -> Any:
    token = request_id.set(rid)
    try:
        return worker.execute(request)
    finally:
        request_id.reset(token)


def test_each_request_gets_one_timing_line_with_its_id_and_stages(
    make_worker: Any, wire: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashrt.timing")
    worker = make_worker()
    assert wire.dec(_run(worker, wire.function(NAP, "nap", 0.05), "rid-nap")) == 0.05
    failing = wire.function("def boom():\n    raise ValueError('no')\n", "boom")
    assert not _run(worker, failing, "rid-boom").success
    lines = _timing_lines(capfd, caplog, expect=0 if worker.rt.settings.isolation == "none" else 2)
    nap = [line for line in lines if "rid-nap" in line]
    boom = [line for line in lines if "rid-boom" in line]
    assert len(nap) == 1 and len(boom) == 1, lines
    assert "function nap: ok in" in nap[0]
    call_ms = float(nap[0].split("call ")[1].split(" ms")[0])
    assert call_ms >= 50  # the stage the time went to is named, with its time
    assert "function boom: failed during call in" in boom[0]


def test_the_timing_line_can_be_turned_off(
    make_worker: Any, wire: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashrt.timing")
    worker = make_worker(timing_log=False)
    assert wire.dec(_run(worker, wire.function(NAP, "nap", 0.01), "rid-quiet")) == 0.01
    time.sleep(0.2)  # an executor would have written its line by now
    assert not [line for line in _timing_lines(capfd, caplog) if "rid-quiet" in line]


def test_an_executor_logs_only_what_the_workers_logging_shows(
    make_worker: Any, wire: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An embedder that never asked for INFO gets no timing lines, from any process."""
    caplog.set_level(logging.WARNING, logger="flashrt")  # Python's default (restored after)
    worker = make_worker()
    assert wire.dec(_run(worker, wire.function(NAP, "nap", 0.01), "rid-unasked")) == 0.01
    time.sleep(0.2)  # an executor would have written its line by now
    assert not [line for line in _timing_lines(capfd, caplog) if "rid-unasked" in line]
    # Asked for on the package's logger, it comes (an executor started now takes the level).
    caplog.set_level(logging.INFO, logger="flashrt")
    worker = make_worker()
    assert wire.dec(_run(worker, wire.function(NAP, "nap", 0.01), "rid-asked")) == 0.01
    expect = 0 if worker.rt.settings.isolation == "none" else 1
    assert [line for line in _timing_lines(capfd, caplog, expect) if "rid-asked" in line]
