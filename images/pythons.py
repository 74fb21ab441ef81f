"""``nox -s pythons``: the image recipe for other Pythons, built and run with a real engine.

* ``docker buildx bake --print`` (Debian's buildx, in a trixie container) of
  images/docker-bake.hcl gives every image for every Python the client asks for (bake.py);
* the CPU ``qb`` image, built as committed on each Debian stand-in base given (default trixie,
  Python 3.13, and forky, Python 3.14), tagged ``py<version>-latest``: its Python is the one its
  tag names, and ``--test_input`` answers fixtures 01 and 07;
* a build whose PYTHON_VERSION is not the base's Python fails at the interpreter check, saying so.

Needs root, Debian's apt and PyPI (podman.py). ``--suite`` picks the bases, ``--keep`` keeps
the images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
sys.path.insert(0, str(IMAGES))

import bake  # noqa: E402  (images/ is not a package)
import checks  # noqa: E402
import podman  # noqa: E402
from dockerfile import image_config  # noqa: E402
from procs import SmokeError, Timings, run  # noqa: E402

#: The suite whose Debian packages a buildx comes from (bookworm has none).
BUILDX_SUITE = "trixie"
WRONG_PYTHON = "3.12"


def tag_for(version: str) -> str:
    return f"localhost/flashrt-test/qb-cpu:py{version}-latest"


class Pythons(Timings):
    def __init__(self) -> None:
        super().__init__("pythons")
        self.engine = podman.Podman()
        self.built: list[str] = []

    def bake_print(self) -> None:
        """The real ``buildx bake --print`` of the committed bake file, checked by bake.py."""
        self.engine.ensure_base(BUILDX_SUITE)
        script = (
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
            " --no-install-recommends docker-buildx >/dev/null"
            " && /usr/libexec/docker/cli-plugins/docker-buildx version"
            " && /usr/libexec/docker/cli-plugins/docker-buildx bake -f images/docker-bake.hcl"
            " --print"
        )
        output = self.engine(
            "run",
            "--rm",
            "--network=host",
            f"--volume={ROOT}:/src:ro",
            "--workdir=/src",
            podman.base_image(BUILDX_SUITE),
            "sh",
            "-c",
            script,
            timeout=300,
        )
        self.note(output.split("\n", 1)[0])
        printed = bake.parse_print(output)
        issues = bake.problems(printed)
        if issues:
            raise SmokeError("docker-bake.hcl: " + "; ".join(issues))
        for name, target in sorted(printed["target"].items()):
            self.note(f"{name:15} {target['tags'][0]:38} on {target['args']['BASE_IMAGE']}")

    def qb(self, suite: str) -> None:
        """The CPU qb image on ``suite``'s base: its tag's Python, answering two jobs."""
        made = self.engine.ensure_base(suite)
        self.note(f"{podman.base_image(suite)} {'made' if made else 'cached'}")
        version = podman.SUITES[suite]
        tag = tag_for(version)
        seconds = self.engine.build(tag, "qb", "cpu", suite=suite)
        self.built.append(tag)
        self.note(f"built {tag} in {seconds:.0f} s")
        self.note(f"{tag}: Python {self.engine.check_python(tag)}")
        _, command = image_config("cpu", "qb")
        for prefix in ("01", "07"):
            job = json.dumps(checks.fixture(prefix))
            done = run(
                ["podman", "run", "--rm", tag, *command, "--test_input", job],
                env=self.engine.env,
                timeout=180,
            )
            output = done.stdout + done.stderr
            response = checks.test_input_output(output)
            checks.check_add_response(response, expected=50, printed="adding 2 + 3")
            self.note(f"{tag}: fixture {prefix} answered")

    def wrong_python(self, suite: str) -> None:
        """PYTHON_VERSION=3.12 on a base with another Python: the build must fail, saying why."""
        tag = tag_for(WRONG_PYTHON)
        try:
            self.engine.build(tag, "qb", "cpu", suite=suite, python_version=WRONG_PYTHON)
        except SmokeError as exc:
            said = f"tagged py{WRONG_PYTHON} but its interpreter python3 is Python"
            if said not in str(exc):
                raise SmokeError(f"the build failed, but not at the Python check:\n{exc}") from exc
            self.note(f"refused: {next(line for line in str(exc).splitlines() if said in line)}")
            return
        self.built.append(tag)
        raise SmokeError(f"{tag} built on {suite}'s Python {podman.SUITES[suite]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(podman.SUITES),
        help="Debian suite of a base to build the CPU qb image on (default: trixie and forky)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the images")
    args = parser.parse_args(argv)
    suites: list[str] = args.suite or ["trixie", "forky"]
    if os.geteuid() != 0:
        print("[pythons] SKIP: needs root (apt-get, podman with runc)", file=sys.stderr)
        return 0
    check = Pythons()
    try:
        with check.step("podman, runc and mmdebstrap installed"):
            podman.ensure_tools()
        with check.step("buildx bake --print: 4 images x the client's Pythons"):
            check.bake_print()
        for suite in suites:
            version = podman.SUITES[suite]
            with check.step(f"qb (cpu) on {suite}: py{version} tag, Python, two jobs"):
                check.qb(suite)
        with check.step(f"PYTHON_VERSION={WRONG_PYTHON} on {suites[0]}: the build fails"):
            check.wrong_python(suites[0])
        check.report()
    except SmokeError as exc:
        print(f"[pythons] FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and check.built:
            with contextlib.suppress(SmokeError):
                check.engine("rmi", "--force", *check.built)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
