"""``flashrt-qb`` / ``python -m flashrt_qb``: the queue worker's entry point.

Arguments are the runpod SDK's own (``--test_input '{"input": {...}}'`` runs one job locally and
exits 0 or 1, ``--rp_log_level``, ...); everything else is configured with environment variables.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """\
usage: flashrt-qb [--test_input JSON] [runpod SDK options]

Runs the flashrt queue worker on the runpod serverless job loop. Without RUNPOD_WEBHOOK_GET_JOB
(or with --test_input) the SDK runs one local job (--test_input, else ./test_input.json) and
exits 0 on success, 1 on failure. Settings come from environment variables (see the README).
"""


def main(argv: list[str] | None = None) -> int:
    """Read the settings and serve; exit 2 on a bad setting."""
    from flashrt_core.settings import Settings, SettingsError, load_settings

    from .settings import QBSettings

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(USAGE, end="")
        return 0
    try:
        settings = load_settings(Settings)
        qb = load_settings(QBSettings)
    except SettingsError as exc:
        print(f"flashrt-qb: bad setting: {exc}", file=sys.stderr)
        return 2
    if qb.concurrency is not None and qb.concurrency < 1:
        print("flashrt-qb: bad setting: FLASHRT_QB_CONCURRENCY must be at least 1", file=sys.stderr)
        return 2
    from flashrt_core.logs import configure_logging

    configure_logging(settings)
    from .worker import QueueWorker

    worker = QueueWorker(settings, qb)
    try:
        worker.serve()
    except SystemExit as exc:  # the SDK's local modes end this way
        if not worker.readiness.left_running:
            raise
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    else:
        code = 0
    if worker.readiness.left_running:
        from flashrt_core.startup import exit_without_joining

        exit_without_joining(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
