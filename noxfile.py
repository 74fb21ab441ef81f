"""Sessions people and CI run: ``uv run nox`` (lint, typecheck, tests) or ``uv run nox -s NAME``.

Every session runs inside the workspace's locked uv environment (``uv run --locked``), so a
fresh machine with only Python and uv gets exactly the locked tools and nothing is installed twice.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

UV_RUN = ("uv", "run", "--locked", "--")
#: The test sessions' environment: the workspace plus the test-only plugins (the ``test-plugins``
#: group), kept apart from ``.venv`` so ``uv run flashrt plugins`` lists only what ships.
TEST_RUN = ("uv", "run", "--locked", "--group", "test-plugins", "--")
TEST_ENV = {"UV_PROJECT_ENVIRONMENT": str(Path(".nox") / "tests-env")}
#: The suite in parallel processes (pytest-xdist), one per CPU up to four: most tests wait on
#: other processes (executors, shells, the fake control plane), so two cores run two at once
#: well. ``loadfile`` keeps a file's tests in one process, so a module's shared workers start
#: once; files go out in collection order (pyproject's ``testpaths``: the long end-to-end files
#: first), not most tests first. Arguments given to a session replace these
#: (``nox -s tests -- -k name``).
PARALLEL = ("-n", "auto", "--maxprocesses", "4", "--dist", "loadfile", "--no-loadscope-reorder")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, contract, e2e with the real client and shells)."""
    args = session.posargs or ["-q", *PARALLEL]
    session.run(*TEST_RUN, "pytest", *args, env=TEST_ENV)


@nox.session
def inprocess(session: nox.Session) -> None:
    """The suite with ``FLASHRT_ISOLATION=none``: user code in the worker's own process."""
    args = session.posargs or ["-q", "-p", "no:randomly", *PARALLEL]
    session.run(*TEST_RUN, "pytest", *args, env={**TEST_ENV, "FLASHRT_ISOLATION": "none"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check; hadolint on the Dockerfile; image pins current."""
    session.run(*UV_RUN, "ruff", "check", ".")
    session.run(*UV_RUN, "ruff", "format", "--check", ".")
    session.run(*UV_RUN, "hadolint", "--failure-threshold", "style", "images/Dockerfile")
    session.run(*UV_RUN, "python", "images/pins.py", "--check")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the four packages, then over the image scripts (images/*.py)."""
    session.run(*UV_RUN, "mypy")
    scripts = sorted(str(path) for path in Path("images").glob("*.py"))
    # images/ is no package: its modules import each other (and tests/' helpers) by name.
    session.run(*UV_RUN, "mypy", *scripts, env={"MYPYPATH": "images:tests"})


@nox.session
def smoke(session: nox.Session) -> None:
    """The images' Python side without Docker (images/smoke.py; not in the default run).

    Builds the wheels, installs exactly what the images' runtime stage installs into a fresh
    virtual environment, and starts flashrt-qb (live and deployed) and flashrt-lb as the images do.
    ``nox -s smoke -- --accelerator gpu`` installs the GPU images' requirements instead.
    """
    session.run(*UV_RUN, "python", "images/smoke.py", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """Build the worker images with podman and run them as RunPod would (images/imagecheck.py).

    Not in the default run: needs root, Debian's apt and PyPI; installs podman, runc and
    mmdebstrap when missing and caches a stand-in base image (no registry is needed).
    """
    session.run(*UV_RUN, "python", "images/imagecheck.py", *session.posargs)


@nox.session
def pythons(session: nox.Session) -> None:
    """The image recipe for other Pythons (images/pythons.py; not in the default run).

    buildx bake --print gives every image for every client Python; the CPU qb image built on
    Debian trixie (3.13) and forky (3.14) bases runs its tag's Python and answers jobs; a build
    whose PYTHON_VERSION is not the base's Python fails. Needs root, as ``nox -s image`` does.
    """
    session.run(*UV_RUN, "python", "images/pythons.py", *session.posargs)


@nox.session
def py314(session: nox.Session) -> None:
    """The test suite on Python 3.14, in a Debian forky container (images/pysuite.py).

    Not in the default run: needs root and podman (installed when missing, as for
    ``nox -s image``). Arguments go to pytest.
    """
    session.run(*UV_RUN, "python", "images/pysuite.py", "--suite", "forky", "--", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, each reported as a ratio against a floor measured in the same run."""
    session.run(*UV_RUN, "python", "benchmarks/run.py", *session.posargs)


def _find_python(version: str) -> str | None:
    """uv's interpreter discovery, then pyenv's installs (uv trips over pyenv's shims)."""
    found = subprocess.run(
        ["uv", "python", "find", "--no-python-downloads", version],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode == 0:
        return found.stdout.strip()
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(root.glob(f"versions/{version}.*/bin/python{version}"))
    return str(candidates[-1]) if candidates else None


@nox.session
@nox.parametrize("python_version", ["3.10", "3.11", "3.12", "3.13"])
def compat(session: nox.Session, python_version: str) -> None:
    """The test suite on another supported Python, when the machine has it (uv finds it).

    Each version gets its own environment under ``.nox/``; a missing interpreter skips.
    """
    interpreter = _find_python(python_version)
    if interpreter is None:
        session.skip(f"no Python {python_version} on this machine")
    env = {"UV_PROJECT_ENVIRONMENT": str(Path(".nox") / f"compat-{python_version}")}
    args = session.posargs or ["-q", "-p", "no:cacheprovider", *PARALLEL]
    session.run(
        "uv",
        "run",
        "--locked",
        "--group",
        "test-plugins",
        "--python",
        interpreter,
        "--",
        "pytest",
        *args,
        env=env,
    )
