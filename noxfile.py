"""Sessions people and CI run: ``uv run nox`` (lint, typecheck, tests) or ``uv run nox -s NAME``.

Every session runs inside the workspace's locked uv environment (``uv run --locked``), so a
fresh machine with only Python and uv gets exactly the locked tools and nothing is installed twice.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

UV_RUN = ("uv", "run", "--locked", "--")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit, contract, e2e with the real client and shells)."""
    args = session.posargs or ["-q"]
    session.run(*UV_RUN, "pytest", *args)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check; hadolint on the Dockerfile; image pins current."""
    session.run(*UV_RUN, "ruff", "check", ".")
    session.run(*UV_RUN, "ruff", "format", "--check", ".")
    session.run(*UV_RUN, "hadolint", "--failure-threshold", "style", "images/Dockerfile")
    session.run(*UV_RUN, "python", "images/pins.py", "--check")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the four packages."""
    session.run(*UV_RUN, "mypy")


@nox.session
def smoke(session: nox.Session) -> None:
    """The images' Python side without Docker (images/smoke.py; not in the default run).

    Builds the wheels, installs exactly what the images' runtime stage installs into a fresh
    virtual environment, and starts flashrt-qb (live and deployed) and flashrt-lb as the images do.
    ``nox -s smoke -- --accelerator gpu`` installs the GPU images' requirements instead.
    """
    session.run(*UV_RUN, "python", "images/smoke.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, each reported as a ratio against a floor measured in the same run."""
    session.run(*UV_RUN, "python", "benchmarks/run.py", *session.posargs)
