"""``nox -s py314``: the whole test suite on a Python this machine lacks, in a Debian container.

The stand-in base of a Debian suite (podman.py; forky has Python 3.14) gets a copy of the
checkout (tracked files and untracked ones git does not ignore; the host's tree is mounted
read-only and never written), then ``uv sync --locked`` and pytest, with the container's
``/usr/bin/python3.X`` and uv never downloading a Python. uv is the host's binary, mounted;
its cache persists under ``$FLASHRT_IMAGE_CACHE`` so a second run downloads nothing.
Arguments after ``--`` go to pytest (default ``-q``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
sys.path.insert(0, str(IMAGES))

import podman  # noqa: E402  (images/ is not a package)
from procs import SmokeError  # noqa: E402

#: The suite's longest run here is about 10 minutes; this bounds a hung one.
SUITE_TIMEOUT_S = 1800


def checkout_files() -> list[str]:
    """What a clean clone would hold plus local changes: git's tracked and unignored files."""
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return [name for name in done.stdout.decode().split("\0") if name and (ROOT / name).exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--suite", default="forky", choices=sorted(podman.SUITES))
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: -q)")
    args = parser.parse_args(argv)
    version = podman.SUITES[args.suite]
    if os.geteuid() != 0:
        print(f"[py{version}] SKIP: needs root (apt-get, podman with runc)", file=sys.stderr)
        return 0
    uv = shutil.which("uv")
    if uv is None:
        print(f"[py{version}] FAILED: uv is not on PATH", file=sys.stderr)
        return 1
    try:
        podman.ensure_tools()
        engine = podman.Podman()
        engine.ensure_base(args.suite)
    except SmokeError as exc:
        print(f"[py{version}] FAILED: {exc}", file=sys.stderr)
        return 1
    cache = podman.CACHE / f"uv-cache-{args.suite}"
    cache.mkdir(parents=True, exist_ok=True)
    listing = podman.CACHE / f"checkout-{args.suite}.txt"
    listing.write_text("\n".join(checkout_files()) + "\n")
    python = f"/usr/bin/python{version}"
    pytest_args = " ".join(args.pytest_args or ["-q"])
    script = (
        "set -e; mkdir /src; cd /checkout; tar -cf - -T /listing | tar -xf - -C /src; cd /src;"
        f" uv sync --locked --quiet --group test-plugins --python {python};"
        f" exec uv run --locked --group test-plugins --python {python} --"
        f" pytest -p no:cacheprovider {pytest_args}"
    )
    command = [
        "podman",
        "run",
        "--rm",
        "--network=host",
        f"--volume={ROOT}:/checkout:ro",
        f"--volume={listing}:/listing:ro",
        f"--volume={uv}:/usr/local/bin/uv:ro",
        f"--volume={cache}:/uv-cache",
        f"--volume={podman.CA_BUNDLE}:{podman.CA_BUNDLE}:ro",
        "--env=UV_CACHE_DIR=/uv-cache",
        "--env=UV_PYTHON_DOWNLOADS=never",
        "--env=UV_PROJECT_ENVIRONMENT=/venv",
        f"--env=SSL_CERT_FILE={podman.CA_BUNDLE}",
        *(f"--env={name}" for name in ("CI", "FLASHRT_ISOLATION") if name in os.environ),
        podman.base_image(args.suite),
        "sh",
        "-c",
        script,
    ]
    print(f"[py{version}] the suite on Debian {args.suite}'s Python {version}", flush=True)
    started = time.monotonic()
    try:
        code = subprocess.run(command, env=engine.env, timeout=SUITE_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        print(f"[py{version}] FAILED: the suite ran past {SUITE_TIMEOUT_S} s", file=sys.stderr)
        return 1
    print(f"[py{version}] pytest exited {code} after {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
