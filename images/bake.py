"""What ``docker buildx bake --print`` of images/docker-bake.hcl must give: 4 images x 4 Pythons.

The client names an image by kind and Python (``runpod/flash-cpu:py3.11-latest``), so every
pair must be a target with that tag, the matching ``python:<version>-slim`` base, the shell and
the accelerator of its kind. The versions are the client's own lists, read from runpod-flash.
``nox -s pythons`` runs the real buildx (Debian's, in a container) and checks its output here;
tests/test_images.py does the same where buildx is on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from procs import SmokeError

IMAGES = Path(__file__).resolve().parent
BAKE_FILE = IMAGES / "docker-bake.hcl"
#: kind -> (repository, Dockerfile target, ACCELERATOR), as docs/contracts.md names them.
KINDS = {
    "gpu": ("runpod/flash", "qb", "gpu"),
    "cpu": ("runpod/flash-cpu", "qb", "cpu"),
    "lb": ("runpod/flash-lb", "lb", "gpu"),
    "lb-cpu": ("runpod/flash-lb-cpu", "lb", "cpu"),
}


def client_versions(kind: str) -> tuple[str, ...]:
    """The Pythons runpod-flash accepts for an image of ``kind``."""
    from runpod_flash.core.resources import constants

    gpu = kind in ("gpu", "lb")
    versions: tuple[str, ...] = (
        constants.GPU_PYTHON_VERSIONS if gpu else constants.CPU_PYTHON_VERSIONS
    )
    return versions


def expected(registry: str = "", suffix: str = "latest") -> dict[str, dict[str, Any]]:
    """Target name -> what --print must say of it, for every kind and client Python."""
    targets: dict[str, dict[str, Any]] = {}
    for kind, (repository, stage, accelerator) in KINDS.items():
        for version in client_versions(kind):
            targets[f"{kind}-py{version.replace('.', '-')}"] = {
                "target": stage,
                "tags": [f"{registry}{repository}:py{version}-{suffix}"],
                "args": {
                    "ACCELERATOR": accelerator,
                    "BASE_IMAGE": f"python:{version}-slim",
                    "PYTHON_VERSION": version,
                },
                "dockerfile": "images/Dockerfile",
            }
    return targets


def problems(printed: dict[str, Any], registry: str = "", suffix: str = "latest") -> list[str]:
    """How ``printed`` (the JSON of bake --print, default group) differs from :func:`expected`."""
    found: dict[str, Any] = printed.get("target", {})
    wanted = expected(registry, suffix)
    issues = [f"missing target {name}" for name in sorted(set(wanted) - set(found))]
    issues += [f"unexpected target {name}" for name in sorted(set(found) - set(wanted))]
    for name in sorted(set(wanted) & set(found)):
        for key, value in wanted[name].items():
            have = found[name].get(key)
            if key == "args":
                have = {arg: (have or {}).get(arg) for arg in value}
            if have != value:
                issues.append(f"{name}: {key} is {have!r}, not {value!r}")
    groups = printed.get("group", {})
    for kind in KINDS:
        members = sorted(groups.get(kind, {}).get("targets", []))
        if members != sorted(name for name in wanted if name.rsplit("-py", 1)[0] == kind):
            issues.append(f"group {kind} builds {members}, not every Python of {kind}")
    if sorted(groups.get("default", {}).get("targets", [])) != sorted(KINDS):
        issues.append(f"the default group is {groups.get('default')}, not the four images")
    return issues


def find_buildx() -> list[str] | None:
    """The command that runs buildx here: Debian's plugin binary, or ``docker buildx``."""
    for candidate in ("docker-buildx", "/usr/libexec/docker/cli-plugins/docker-buildx"):
        found = shutil.which(candidate)
        if found:
            return [found]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "buildx"]
    return None


def parse_print(output: str) -> dict[str, Any]:
    """The JSON document in what ``bake --print`` wrote (buildx may print progress first)."""
    start = output.find("{")
    if start < 0:
        raise SmokeError(f"bake --print gave no JSON:\n{output[-2000:]}")
    document, _ = json.JSONDecoder().raw_decode(output[start:])
    if not isinstance(document, dict):
        raise SmokeError("bake --print gave JSON that is not an object")
    return document
