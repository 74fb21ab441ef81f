"""``flashrt-lb`` / ``python -m flashrt_lb``: the HTTP worker's entry point."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Read the settings, then serve until stopped. Exit 2 on a bad setting."""
    from flashrt_core.settings import Settings, SettingsError, load_settings

    from .settings import LBSettings

    args = sys.argv[1:] if argv is None else argv
    if args:
        print(
            "usage: flashrt-lb  (no arguments: configure it with environment variables, "
            "see the README)",
            file=sys.stderr,
        )
        return 0 if args[0] in ("-h", "--help") else 2
    try:
        settings = load_settings(Settings)
        lb_settings = load_settings(LBSettings)
    except SettingsError as exc:
        print(f"flashrt-lb: bad setting: {exc}", file=sys.stderr)
        return 2
    from flashrt_core.logs import configure_logging

    configure_logging(settings)
    from .app import Worker
    from .server import run

    worker = Worker(settings, lb_settings)
    run(worker)
    if worker.readiness.left_running:
        from flashrt_core.startup import exit_without_joining

        exit_without_joining(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
