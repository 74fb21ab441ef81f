"""``flashrt``: run one request through the full runtime, or show the loaded plugins."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _read(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    return Path(source).read_bytes()


def _exec(args: argparse.Namespace) -> int:
    from .protocol import encode_response
    from .runtime import Runtime

    try:
        body = _read(args.file)
    except OSError as exc:
        print(f"flashrt: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        runtime = Runtime()
        # The request's output echoes live on stderr: stdout is kept for the response JSON.
        runtime.echo_streams = lambda _number: sys.stderr
        await runtime.start()
        try:
            if runtime.startup_error:
                print(f"flashrt: {runtime.startup_error}", file=sys.stderr)
                return 1
            response = await runtime.execute(body)
        finally:
            await runtime.shutdown()
        out = encode_response(response)
        if args.pretty:
            out = json.dumps(json.loads(out), indent=2).encode()
        sys.stdout.buffer.write(out + b"\n")
        sys.stdout.flush()
        return 0 if response.success else 1

    return asyncio.run(run())


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import describe_plugins, get_plugin_manager

    rows = describe_plugins(get_plugin_manager())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  [{row['origin']}]  {row['module']}")
        for hook in row["hooks"]:
            print(f"    {hook}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="flashrt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flashrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("exec", help="execute one FunctionRequest and print the response JSON")
    run.add_argument("file", help="request file (bare or {'input': {...}}), or - for stdin")
    run.add_argument("--pretty", action="store_true", help="indent the response JSON")
    run.set_defaults(func=_exec)
    plugins = sub.add_parser("plugins", help="list loaded plugins and the hooks they implement")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flashrt`` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except Exception as exc:  # a broken plugin or bad setting: say so, no traceback wall
        print(f"flashrt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
