"""A container engine on a machine without a registry, for ``nox -s image``.

Debian's podman (4.3) with runc, configured by a ``containers.conf`` of our own (crun refuses
hybrid cgroups; podman's default ulimits exceed what root may set here), and a stand-in base
image made by mmdebstrap, since no registry is reachable. Everything is cached under
``$FLASHRT_IMAGE_CACHE`` (default ``/var/tmp/flashrt-image``) so a second run rebuilds nothing
but our images.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procs import SmokeError, run

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FLASHRT_IMAGE_CACHE", "/var/tmp/flashrt-image"))
BASE_PACKAGES = "ca-certificates,netbase,tzdata,python3,python3-venv,python-is-python3"
#: Debian suite -> the Python its python3 is: the stand-in for python:<version>-slim.
SUITES = {"bookworm": "3.11", "trixie": "3.13", "forky": "3.14"}
BASE_IMAGE = "localhost/flashrt-standin-base:bookworm"
#: The host's CA bundle: PyPI is reached through a TLS-intercepting proxy on some machines.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TOOLS = {"podman": "podman", "mmdebstrap": "mmdebstrap", "runc": "runc"}


def ensure_tools() -> None:
    """apt-get install what is missing of podman, runc and mmdebstrap (needs root)."""
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, timeout=300)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env, timeout=600)


def containers_conf() -> Path:
    """runc, and ulimits root may actually set (nofile at the hard limit, nproc 32768)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = "1048576" if hard == resource.RLIM_INFINITY else str(hard)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "containers.conf"
    path.write_text(
        '[engine]\nruntime = "runc"\n\n[containers]\n'
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
    )
    return path


class Podman:
    """``podman`` with our containers.conf; every call bounded in time."""

    def __init__(self) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(containers_conf())}

    def __call__(self, *args: str, timeout: float = 120.0) -> str:
        return run(["podman", *args], env=self.env, timeout=timeout).stdout

    def popen(self, args: Sequence[str], log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["podman", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def exists(self, image: str) -> bool:
        done = subprocess.run(
            ["podman", "image", "exists", image], env=self.env, check=False, timeout=60
        )
        return done.returncode == 0

    def ensure_base(self, suite: str = "bookworm") -> bool:
        """The stand-in base: Debian ``suite`` minbase with Python; False when it was cached."""
        image = base_image(suite)
        if self.exists(image):
            return False
        tarball = CACHE / f"base-{suite}.tar"
        # Debian's EXTERNALLY-MANAGED marker is removed, as python:3.12-slim has none. The
        # mirror's Release files of testing may be past their Valid-Until on a machine whose
        # clock runs ahead: their signatures are still checked.
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--aptopt=Acquire::Check-Valid-Until false",
                f"--include={BASE_PACKAGES}",
                '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
                suite,
                tarball,
            ],
            timeout=600,
        )
        try:
            self(
                "import",
                "--change",
                f"ENV SSL_CERT_FILE={CA_BUNDLE}",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                'CMD ["python3"]',
                str(tarball),
                image,
                timeout=300,
            )
        finally:
            tarball.unlink(missing_ok=True)
        return True

    def build(
        self,
        tag: str,
        target: str,
        accelerator: str,
        *,
        suite: str = "bookworm",
        python_version: str | None = None,
    ) -> float:
        """images/Dockerfile's ``target`` on the ``suite`` stand-in base; the seconds it took.

        ``python_version`` (default: the suite's) is the build's PYTHON_VERSION: the Dockerfile
        fails the build when the base's Python is another. ``--no-cache``: buildah 1.28's layer
        cache can bind-mount an empty directory for ``--mount=from=builder``. The dangling
        intermediates are pruned afterwards.
        """
        base = base_image(suite)
        version = python_version or SUITES[suite]
        started = time.monotonic()
        try:
            self(
                "build",
                "--no-cache",
                "--file",
                str(ROOT / "images" / "Dockerfile"),
                "--ignorefile",
                str(ROOT / "images" / "Dockerfile.dockerignore"),
                "--target",
                target,
                "--build-arg",
                f"BASE_IMAGE={base}",
                "--build-arg",
                f"BUILDER_IMAGE={base}",
                "--build-arg",
                f"ACCELERATOR={accelerator}",
                "--build-arg",
                f"PYTHON_VERSION={version}",
                "--volume",
                f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
                "--tag",
                tag,
                str(ROOT),
                timeout=900,
            )
        finally:
            with contextlib.suppress(SmokeError):
                self("image", "prune", "--force", timeout=120)
        return time.monotonic() - started

    def check_python(self, tag: str) -> str:
        """The image's python3 is the version its tag names (run time); returns the version."""
        wanted = image_python(tag)
        probe = "import sys; print('%d.%d' % sys.version_info[:2])"
        found = self("run", "--rm", tag, "python3", "-c", probe, timeout=120).split()[-1]
        if found != wanted:
            raise SmokeError(f"{tag} is tagged for Python {wanted} but runs Python {found}")
        return found

    def added_layers(self, image: str, suite: str = "bookworm") -> list[tuple[int, str]]:
        """(bytes, instruction) of each layer ``image`` adds on top of its base, top first."""
        ours = json.loads(self("history", "--format", "json", image))
        base = json.loads(self("history", "--format", "json", base_image(suite)))
        return [(int(entry["size"]), str(entry["CreatedBy"])) for entry in ours[: -len(base)]]

    def state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self("inspect", "--format", "{{json .State}}", name))
        return state

    def remove(self, name: str) -> None:
        """Force-remove a container, whatever state it is in (cleanup never raises)."""
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", name],
            env=self.env,
            capture_output=True,
            check=False,
            timeout=60,
        )

    @contextlib.contextmanager
    def detached(
        self, name: str, image: str, args: Sequence[str], env: Mapping[str, str]
    ) -> Iterator[str]:
        """``podman run -d``; the container is removed on the way out, even on failure."""
        self.remove(name)
        try:
            self("run", "--detach", "--name", name, *env_flags(env), *args, image)
            yield name
        finally:
            self.remove(name)


def base_image(suite: str) -> str:
    """The name of the stand-in base made from Debian ``suite``."""
    if suite not in SUITES:
        raise SmokeError(f"no stand-in base for Debian {suite!r}: known are {sorted(SUITES)}")
    return f"localhost/flashrt-standin-base:{suite}"


def image_python(tag: str) -> str:
    """The Python version an image's tag names: ``...:py3.13-latest`` -> ``3.13``."""
    _, _, name = tag.rpartition(":")
    version, sep, _ = name.removeprefix("py").partition("-")
    if not name.startswith("py") or not sep or version.count(".") != 1:
        raise SmokeError(f"{tag}: its tag names no Python (py<major.minor>-<suffix>)")
    return version


def env_flags(env: Mapping[str, str]) -> list[str]:
    return [f"--env={key}={value}" for key, value in env.items()]
