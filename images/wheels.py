"""The Dockerfile's builder and install steps, done outside a container for ``nox -s smoke``.

The wheels are built from the same files the builder stage copies, installed by the same
install-runtime.sh with the same requirements file, and the result compared with the pins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pins
from procs import SmokeError, run

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
WHEELS = ("flashrt_core", "flashrt_installers", "flashrt_lb", "flashrt_qb")
#: What deployed artifacts import without bundling it (docs/contracts.md), plus our own.
PROVIDED_MODULES = (
    "runpod",
    "cloudpickle",
    "pydantic",
    "httpx",
    "aiohttp",
    "fastapi",
    "uvicorn",
    *WHEELS,
)
#: What the GPU images add: hf_transfer, and the torch stack `flash build` never bundles.
GPU_MODULES = ("hf_transfer", "torch", "torchvision", "torchaudio")


def build_wheels(uv: str, src: Path, dist: Path) -> None:
    """The builder stage: the same files the Dockerfile COPYs into ``src``, then ``uv build``."""
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / "uv.lock", src)
    shutil.copytree(
        ROOT / "packages",
        src / "packages",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests", "build", "dist"),
    )
    run(
        [uv, "build", "--all-packages", "--wheel", "--out-dir", dist],
        cwd=src,
        env={**os.environ, "UV_NO_CACHE": "1"},
    )
    built = sorted(path.name.split("-")[0] for path in dist.glob("*.whl"))
    if built != sorted(WHEELS):
        raise SmokeError(f"uv build made wheels {built}, expected {sorted(WHEELS)}")


def install(uv: str, python: str, venv: Path, accelerator: str, dist: Path) -> None:
    """The runtime stage's install: install-runtime.sh, as the Dockerfile runs it."""
    run([uv, "venv", "--quiet", "--python", python, venv])
    run(
        [
            "sh",
            IMAGES / "install-runtime.sh",
            venv / "bin" / "python",
            pins.requirements_path(accelerator),
            dist,
        ],
        env={**os.environ, "UV": uv, "VIRTUAL_ENV": ""},
    )


def verify_install(uv: str, venv: Path, accelerator: str, dist: Path) -> str:
    """Exactly the pins (those whose markers hold here) plus our wheels, consistent.

    Returns a one-line summary.
    """
    python = venv / "bin" / "python"
    listed = run([uv, "pip", "list", "--format", "json", "--python", python]).stdout
    installed = {_normalize(item["name"]): item["version"] for item in json.loads(listed)}
    wanted = _expected_pins(python, accelerator)
    wanted.update({_normalize(name): _wheel_version(dist, name) for name in WHEELS})
    if installed != wanted:
        missing = sorted(set(wanted) - set(installed))
        extra = sorted(set(installed) - set(wanted))
        other = sorted(k for k in set(wanted) & set(installed) if wanted[k] != installed[k])
        raise SmokeError(
            f"installed set differs from the pins: missing {missing}, extra {extra},"
            f" other versions {other}"
        )
    run([uv, "pip", "check", "--python", python])
    modules = PROVIDED_MODULES + (GPU_MODULES if accelerator == "gpu" else ())
    run([python, "-c", f"import {', '.join(modules)}"])
    version = run([venv / "bin" / "uv", "--version"]).stdout.split()[1]
    if version != wanted["uv"]:
        raise SmokeError(f"the environment's uv is {version}, the pins say {wanted['uv']}")
    for script in ("flashrt-qb", "flashrt-lb", "flashrt"):
        if not (venv / "bin" / script).exists():
            raise SmokeError(f"console script {script} was not installed")
    return f"{len(installed)} distributions, uv {version}"


def _expected_pins(python: Path, accelerator: str) -> dict[str, str]:
    """name -> version of the requirements lines whose markers hold for ``python``."""
    from packaging.markers import Marker

    marker_env = json.loads(
        run(
            [
                python,
                "-c",
                "import json; from packaging.markers import default_environment as d;"
                " print(json.dumps(d()))",
            ]
        ).stdout
    )
    wanted = {}
    for line in _pins(pins.requirements_path(accelerator).read_text()):
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate(marker_env):
            continue
        wanted[_normalize(name)] = version.strip()
    return wanted


def _pins(text: str) -> list[str]:
    """The ``name==version[; marker]`` lines of a requirements text."""
    lines = []
    for line in text.splitlines():
        line = line.strip().rstrip("\\").strip()
        if line and not line.startswith(("#", "-")) and "==" in line:
            lines.append(line)
    return lines


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _wheel_version(dist: Path, name: str) -> str:
    (wheel,) = dist.glob(f"{name}-*.whl")
    return wheel.name.split("-")[1]
