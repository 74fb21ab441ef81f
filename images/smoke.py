"""``nox -s smoke``: prove the images' Python side works, without a Docker engine.

It repeats what images/Dockerfile does, outside a container, then starts the shells the way the
images do:

1. ``images/pins.py --check``: the pinned requirements match uv.lock;
2. builder stage: copy what the Dockerfile copies, ``uv build --all-packages --wheel``;
3. runtime stage: a fresh virtual environment (``uv venv``, the machine's Python), then
   ``images/install-runtime.sh`` with the same requirements file and wheels the image uses; the
   environment must then hold exactly those pins and wheels, consistent (``uv pip check``), with
   everything deployed artifacts expect the image to provide importable and uv on PATH;
4. the image's default commands, with the image's ENV (both read from the Dockerfile):
   ``flashrt-qb --test_input`` on a captured client request (live mode), ``flashrt-qb
   --test_input`` on a real ``flash build`` artifact (deployed mode), and ``flashrt-lb`` on a
   loopback port: ``/ping`` answers 204 while starting then 200, ``/execute`` runs a captured
   client request.

Paths the image owns under /root (app dir, package caches) and the network volume are pointed
at a temporary directory. Run it as ``uv run --locked -- python images/smoke.py`` (``--keep`` keeps
the temporary directory, ``--accelerator gpu`` installs the GPU images' requirements).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

IMAGES = Path(__file__).resolve().parent
sys.path.insert(0, str(IMAGES))

import checks  # noqa: E402  (images/ is not a package)
import pins  # noqa: E402
import wheels  # noqa: E402
from dockerfile import image_config  # noqa: E402
from procs import SmokeError, Timings, free_port, run, stop, tail, which  # noqa: E402

#: The PATH of the Debian-based images, after the environment's own bin directory.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_TIMEOUT_S = 90.0


class Smoke(Timings):
    """One smoke run in a temporary directory."""

    def __init__(self, work: Path, accelerator: str, python: str, fixtures: Path) -> None:
        self.work = work
        self.accelerator = accelerator
        self.python = python
        self.fixtures = fixtures
        super().__init__("smoke")
        self.uv = which("uv")
        self.dist = work / "dist"
        self.venv = work / "venv"
        self.last_output = ""

    # -- 1-3: pins, wheels, install -----------------------------------------------------------

    def check_pins(self) -> None:
        problems = pins.check()
        if problems:
            raise SmokeError(
                "; ".join(problems) + ": run `uv run python images/pins.py` and commit images/"
            )

    def build_wheels(self) -> None:
        wheels.build_wheels(self.uv, self.work / "src", self.dist)

    def install(self) -> None:
        wheels.install(self.uv, self.python, self.venv, self.accelerator, self.dist)

    def verify_install(self) -> None:
        summary = wheels.verify_install(self.uv, self.venv, self.accelerator, self.dist)
        self.note(summary)

    # -- 4: the shells ------------------------------------------------------------------------

    def shell_env(self, shell: str, **extra: str) -> tuple[dict[str, str], list[str]]:
        """The image's ENV and CMD for ``shell``, with /root paths and the volume made local."""
        image_env, command = image_config(self.accelerator, shell)
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        env = {
            "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self._dir("tmp")),
            # The image's paths under /root and the network volume, kept inside the work dir.
            "FLASHRT_APP_DIR": str(self.work / f"app-{shell}"),
            "FLASHRT_CACHE_DIR": str(self._dir("cache")),
            "FLASHRT_VOLUME_DIR": str(self.work / "no-volume"),
        }
        env.update(image_env)
        if "HF_HOME" in env:
            env["HF_HOME"] = str(self._dir("hf-cache"))
        env.update(extra)
        return env, command

    def _dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(exist_ok=True)
        return path

    def qb_test_input(self, job: dict[str, Any], **extra: str) -> Any:
        """``<qb CMD> --test_input JOB``; the job's output as the SDK reports it."""
        env, command = self.shell_env("qb", **extra)
        done = run(
            [*command, "--test_input", json.dumps(job)],
            cwd=self._dir("cwd"),
            env=env,
            timeout=SHELL_TIMEOUT_S,
        )
        self.last_output = done.stdout + done.stderr
        return checks.test_input_output(self.last_output)

    def qb_live(self) -> None:
        """Fixture 01: add(2, 3, scale=10) printing "adding 2 + 3" -> 50."""
        response = self.qb_test_input(checks.fixture("01", self.fixtures))
        checks.check_add_response(response, expected=50, printed="adding 2 + 3")

    def qb_deployed(self) -> None:
        """A real ``flash build`` artifact, selected by ``FLASH_RESOURCE_NAME``: 50 again."""
        artifact = checks.build_deployed_artifact(self._dir("project"), self._dir("home"))
        output = self.qb_test_input(
            checks.DEPLOYED_JOB,
            FLASH_BUILD_ARTIFACT_PATH=str(artifact),
            FLASH_RESOURCE_NAME=checks.DEPLOYED_RESOURCE,
            RUNPOD_ENDPOINT_ID="smoke-deployed",
        )
        checks.check_deployed_output(output, self.last_output)

    def lb_live(self) -> dict[str, Any]:
        """``flashrt-lb`` on a loopback port: /ping 204 then 200, /execute fixture 08 -> 18."""
        port = free_port()
        env, command = self.shell_env("lb", PORT=str(port), FLASHRT_LB_HOST="127.0.0.1")
        log_path = self.work / "flashrt-lb.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=self._dir("cwd"),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            statuses = checks.check_lb(port, process)
        except SmokeError as exc:
            raise SmokeError(f"{exc}\nflashrt-lb output:\n{tail(log_path.read_text())}") from exc
        finally:
            code = stop(process)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is clean.
        if code not in (0, -signal.SIGTERM):
            raise SmokeError(f"flashrt-lb exited {code} on SIGTERM:\n{tail(log_path.read_text())}")
        return {"ping": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--accelerator", choices=sorted(pins.VARIANTS), default="cpu")
    parser.add_argument(
        "--python",
        default=shutil.which("python3.11", path="/usr/local/bin:/usr/bin") or sys.executable,
        help="interpreter of the fresh environment (default: the machine's python3.11)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    fixtures = checks.fixtures_dir()

    work = Path(tempfile.mkdtemp(prefix="flashrt-smoke-"))
    smoke = Smoke(work, args.accelerator, args.python, fixtures)
    try:
        with smoke.step("pins match uv.lock"):
            smoke.check_pins()
        with smoke.step("builder stage: uv build"):
            smoke.build_wheels()
        with smoke.step(f"runtime stage: install ({args.accelerator}, {args.python})"):
            smoke.install()
        with smoke.step("installed set == pins + wheels"):
            smoke.verify_install()
        with smoke.step("flashrt-qb --test_input, live (fixture 01)"):
            smoke.qb_live()
        with smoke.step("flashrt-qb --test_input, deployed (flash build artifact)"):
            smoke.qb_deployed()
        with smoke.step("flashrt-lb, /ping and /execute (fixture 08)"):
            seen = smoke.lb_live()
            smoke.note(f"/ping answers seen: {seen['ping']}")
        smoke.report()
    except SmokeError as exc:
        print(f"[smoke] FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"[smoke] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
