"""What images/Dockerfile says each image runs with: the ENV of its stage chain and its CMD.

``nox -s smoke`` starts the shells with exactly this environment, and tests/test_images.py checks
it, so the recipe is read in one place rather than restated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from procs import SmokeError

if TYPE_CHECKING:
    from collections.abc import Iterator

IMAGES = Path(__file__).resolve().parent
DOCKERFILE = IMAGES / "Dockerfile"


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def image_config(accelerator: str, shell: str) -> tuple[dict[str, str], list[str]]:
    """The ENV and CMD the image ``shell`` (qb or lb) of ``accelerator`` gets from the Dockerfile.

    Follows the stage chain the Dockerfile builds: runtime -> runtime-<accelerator> -> shell.
    """
    stages: dict[str, tuple[str, dict[str, str], list[str] | None]] = {}
    current: str | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
            parent = parts[0].replace("${ACCELERATOR}", accelerator)
            stages[name] = (parent, {}, None)
            current = name
        elif current is not None and keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                stages[current][1][key] = value
        elif current is not None and keyword == "CMD":
            parent, env, _ = stages[current]
            stages[current] = (parent, env, json.loads(rest))
    chain = []
    link = shell
    while link in stages:
        chain.append(link)
        link = stages[link][0]
    if "runtime" not in chain:
        raise SmokeError(f"images/Dockerfile: stage {shell!r} does not build on 'runtime'")
    merged: dict[str, str] = {}
    command: list[str] | None = None
    for stage in reversed(chain):
        merged.update(stages[stage][1])
        command = stages[stage][2] or command
    if not command:
        raise SmokeError(f"images/Dockerfile: stage {shell!r} has no CMD")
    return merged, command
