"""Export the images' pinned runtime requirements from uv.lock, or check they are current.

The runtime stage of images/Dockerfile and ``nox -s smoke`` both install
``images/requirements-<accelerator>.txt`` plus the four flashrt wheels (through
images/install-runtime.sh), so the image gets exactly the versions the lock file and CI tested.
Those files are ``uv export`` of the workspace's runtime dependencies and of the root
dependency group ``image`` (``image-gpu`` adds hf_transfer), without the workspace packages
themselves, which are installed from the wheels. The Dockerfile's ``ARG UV_VERSION`` (the uv
that builds the wheels and installs the runtime) is kept equal to the uv pinned there.

    python images/pins.py           # rewrite the files after a dependency change (after uv lock)
    python images/pins.py --check   # fail if they are stale (nox -s lint runs this)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
DOCKERFILE = IMAGES / "Dockerfile"

#: accelerator -> the root dependency group exported next to the workspace's own dependencies.
VARIANTS = {"cpu": "image", "gpu": "image-gpu"}

_UV_ARG = re.compile(r"^ARG UV_VERSION=(\S+)$", re.MULTILINE)
_UV_PIN = re.compile(r"^uv==(\S+?)(?:\s|$)", re.MULTILINE)


def requirements_path(accelerator: str) -> Path:
    """The requirements file the image of this accelerator installs."""
    return IMAGES / f"requirements-{accelerator}.txt"


def export(accelerator: str) -> str:
    """The requirements text for one accelerator, fresh from uv.lock (which must be current)."""
    group = VARIANTS[accelerator]
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("pins.py: uv is not on PATH")
    command = [
        uv,
        "export",
        "--locked",
        "--format",
        "requirements-txt",
        "--no-dev",
        "--group",
        group,
        "--no-emit-workspace",
        "--no-header",
        "--quiet",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pins.py: {' '.join(command[1:])} failed:\n{done.stderr.strip()}")
    header = (
        f"# Runtime requirements of the {accelerator.upper()} images: the flashrt packages'"
        f" dependencies plus\n# the dependency group {group!r}, exported from uv.lock by"
        " images/pins.py. Do not edit:\n# run `uv run python images/pins.py` after `uv lock`.\n"
    )
    return header + done.stdout


def uv_pin(requirements: str) -> str:
    """The uv version pinned in a requirements text."""
    found = _UV_PIN.search(requirements)
    if found is None:
        raise SystemExit("pins.py: uv is not among the exported requirements")
    return found.group(1)


def dockerfile_uv_version(text: str) -> str:
    """The Dockerfile's ``ARG UV_VERSION`` default."""
    found = _UV_ARG.search(text)
    if found is None:
        raise SystemExit(f"pins.py: no 'ARG UV_VERSION=...' line in {DOCKERFILE}")
    return found.group(1)


def check() -> list[str]:
    """Problems that make the committed files differ from what uv.lock gives (empty: current)."""
    problems = []
    exported = {accelerator: export(accelerator) for accelerator in VARIANTS}
    for accelerator, text in exported.items():
        path = requirements_path(accelerator)
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing")
        elif path.read_text() != text:
            problems.append(f"{path.relative_to(ROOT)} differs from uv.lock")
    wanted = uv_pin(exported["cpu"])
    have = dockerfile_uv_version(DOCKERFILE.read_text())
    if have != wanted:
        problems.append(f"images/Dockerfile has ARG UV_VERSION={have}, uv.lock pins uv {wanted}")
    return problems


def write() -> None:
    """Rewrite both requirements files and the Dockerfile's UV_VERSION from uv.lock."""
    exported = {accelerator: export(accelerator) for accelerator in VARIANTS}
    for accelerator, text in exported.items():
        requirements_path(accelerator).write_text(text)
    dockerfile = DOCKERFILE.read_text()
    updated = _UV_ARG.sub(f"ARG UV_VERSION={uv_pin(exported['cpu'])}", dockerfile, count=1)
    if updated != dockerfile:
        DOCKERFILE.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    if not args.check:
        write()
        return 0
    problems = check()
    for problem in problems:
        print(f"pins.py: {problem}", file=sys.stderr)
    if problems:
        print(
            "pins.py: the images' pinned requirements are stale; run"
            " `uv run python images/pins.py` and commit images/",
            file=sys.stderr,
        )
        return 1
    print("pins.py: images/requirements-*.txt and UV_VERSION match uv.lock")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
