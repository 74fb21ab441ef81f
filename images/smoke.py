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
import ast
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
DOCKERFILE = IMAGES / "Dockerfile"
sys.path.insert(0, str(IMAGES))

import pins  # noqa: E402  (images/ is not a package)

FIXTURES_ENV = "FLASHRT_FIXTURES_DIR"
#: Where the captured client requests live: shared/fixtures beside the checkout, unless set.
DEFAULT_FIXTURES = ROOT / "packages" / "flashrt-core" / "tests" / "fixtures" / "client-requests"

WHEELS = ("flashrt_core", "flashrt_installers", "flashrt_lb", "flashrt_qb")
#: What deployed artifacts import without bundling it (REFERENCE.md section 5), plus our own.
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
GPU_MODULES = ("hf_transfer",)

#: The PATH of the Debian-based images, after the environment's own bin directory.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_TIMEOUT_S = 90.0
PING_DEADLINE_S = 60.0

DEPLOYED_APP = """\
from runpod_flash import Endpoint


@Endpoint(name="sync_worker", cpu="cpu3c-1-2")
def add(a, b, scale=1):
    print(f"adding {a} + {b}")
    return (a + b) * scale
"""


class SmokeError(Exception):
    """A smoke step failed; the message says which and why."""


# --------------------------------------------------------------------------------------------
# small helpers


def _run(
    command: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise SmokeError with its output when it fails."""
    shown = " ".join(str(part) for part in command)
    try:
        done = subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SmokeError(f"`{shown}` did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise SmokeError(
            f"`{shown}` exited {done.returncode}:\n{_tail(done.stdout)}\n{_tail(done.stderr)}"
        )
    return done


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SmokeError(f"{name} is not on PATH (run this through `uv run --locked --`)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fixture(fixtures: Path, prefix: str) -> dict[str, Any]:
    """The body of the first captured request in ``fixtures/<prefix>_*.json``."""
    matches = sorted(fixtures.glob(f"{prefix}_*.json"))
    if not matches:
        raise SmokeError(f"no fixture {prefix}_*.json in {fixtures} (set {FIXTURES_ENV})")
    body: dict[str, Any] = json.loads(matches[0].read_text())[0]["body"]
    return body


def _unpickle(encoded: str) -> Any:
    import cloudpickle

    return cloudpickle.loads(base64.b64decode(encoded))


# --------------------------------------------------------------------------------------------
# what the Dockerfile says: ENV per stage, default command per shell


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


# --------------------------------------------------------------------------------------------
# the steps


class Smoke:
    """One smoke run in a temporary directory."""

    def __init__(self, work: Path, accelerator: str, python: str, fixtures: Path) -> None:
        self.work = work
        self.accelerator = accelerator
        self.python = python
        self.fixtures = fixtures
        self.uv = _which("uv")
        self.dist = work / "dist"
        self.venv = work / "venv"
        self.timings: list[tuple[str, float]] = []
        self.last_output = ""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"[smoke] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.timings.append((name, elapsed))
        print(f"[smoke] {name}: ok ({elapsed:.1f} s)", flush=True)

    # -- 1-3: pins, wheels, install -----------------------------------------------------------

    def check_pins(self) -> None:
        problems = pins.check()
        if problems:
            raise SmokeError(
                "; ".join(problems) + ": run `uv run python images/pins.py` and commit images/"
            )

    def build_wheels(self) -> None:
        """The builder stage: the same files the Dockerfile COPYs, then ``uv build``."""
        src = self.work / "src"
        src.mkdir()
        shutil.copy2(ROOT / "pyproject.toml", src)
        shutil.copy2(ROOT / "uv.lock", src)
        shutil.copytree(
            ROOT / "packages",
            src / "packages",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests", "build", "dist"),
        )
        _run(
            [self.uv, "build", "--all-packages", "--wheel", "--out-dir", self.dist],
            cwd=src,
            env={**os.environ, "UV_NO_CACHE": "1"},
        )
        built = sorted(path.name.split("-")[0] for path in self.dist.glob("*.whl"))
        if built != sorted(WHEELS):
            raise SmokeError(f"uv build made wheels {built}, expected {sorted(WHEELS)}")

    def install(self) -> None:
        """The runtime stage's install: install-runtime.sh, as the Dockerfile runs it."""
        _run([self.uv, "venv", "--quiet", "--python", self.python, self.venv])
        _run(
            [
                "sh",
                IMAGES / "install-runtime.sh",
                self.venv / "bin" / "python",
                pins.requirements_path(self.accelerator),
                self.dist,
            ],
            env={**os.environ, "UV": self.uv, "VIRTUAL_ENV": ""},
        )

    def verify_install(self) -> None:
        """Exactly the pins (those whose markers hold here) plus our wheels, consistent."""
        python = self.venv / "bin" / "python"
        listed = _run([self.uv, "pip", "list", "--format", "json", "--python", python]).stdout
        installed = {_normalize(item["name"]): item["version"] for item in json.loads(listed)}
        wanted = self._expected_pins(python)
        wanted.update({_normalize(name): _wheel_version(self.dist, name) for name in WHEELS})
        if installed != wanted:
            missing = sorted(set(wanted) - set(installed))
            extra = sorted(set(installed) - set(wanted))
            other = sorted(k for k in set(wanted) & set(installed) if wanted[k] != installed[k])
            raise SmokeError(
                f"installed set differs from the pins: missing {missing}, extra {extra},"
                f" other versions {other}"
            )
        _run([self.uv, "pip", "check", "--python", python])
        modules = PROVIDED_MODULES + (GPU_MODULES if self.accelerator == "gpu" else ())
        _run([python, "-c", f"import {', '.join(modules)}"])
        version = _run([self.venv / "bin" / "uv", "--version"]).stdout.split()[1]
        if version != wanted["uv"]:
            raise SmokeError(f"the environment's uv is {version}, the pins say {wanted['uv']}")
        for script in ("flashrt-qb", "flashrt-lb", "flashrt"):
            if not (self.venv / "bin" / script).exists():
                raise SmokeError(f"console script {script} was not installed")
        print(f"[smoke]   {len(installed)} distributions, uv {version}", flush=True)

    def _expected_pins(self, python: Path) -> dict[str, str]:
        """name -> version of the requirements lines whose markers hold for ``python``."""
        from packaging.markers import Marker

        marker_env = json.loads(
            _run(
                [
                    python,
                    "-c",
                    "import json; from packaging.markers import default_environment as d;"
                    " print(json.dumps(d()))",
                ]
            ).stdout
        )
        wanted = {}
        for line in _pins(pins.requirements_path(self.accelerator).read_text()):
            requirement, _, marker = line.partition(";")
            name, _, version = requirement.strip().partition("==")
            if marker.strip() and not Marker(marker.strip()).evaluate(marker_env):
                continue
            wanted[_normalize(name)] = version.strip()
        return wanted

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
        done = _run(
            [*command, "--test_input", json.dumps(job)],
            cwd=self._dir("cwd"),
            env=env,
            timeout=SHELL_TIMEOUT_S,
        )
        output = done.stdout + done.stderr
        self.last_output = output
        found = _sdk_job_result(output)
        if found is None:
            raise SmokeError(f"flashrt-qb printed no job result:\n{_tail(output)}")
        result: dict[str, Any] = ast.literal_eval(found)
        if "output" not in result:
            raise SmokeError(f"flashrt-qb job has no output: {result}")
        return result["output"]

    def qb_live(self) -> None:
        """Fixture 01: add(2, 3, scale=10) printing "adding 2 + 3" -> 50."""
        response = self.qb_test_input(_fixture(self.fixtures, "01"))
        if not (isinstance(response, dict) and response.get("success") is True):
            raise SmokeError(f"live job failed: {response}")
        value = _unpickle(response["result"])
        if value != 50 or "adding 2 + 3" not in (response.get("stdout") or ""):
            raise SmokeError(f"live job answered {value!r} with stdout {response.get('stdout')!r}")

    def qb_deployed(self) -> None:
        """A real ``flash build`` artifact, selected by ``FLASH_RESOURCE_NAME``: 50 again."""
        project = self._dir("project")
        (project / "sync_worker.py").write_text(DEPLOYED_APP)
        flash_env = {
            **os.environ,
            "HOME": str(self._dir("home")),
            "RUNPOD_FLASH_SILENCE_DEPRECATION": "1",
        }
        _run([_which("flash"), "build"], cwd=project, env=flash_env, timeout=180)
        artifact = project / ".flash" / "artifact.tar.gz"
        if not artifact.is_file():
            raise SmokeError(f"flash build made no {artifact}")
        output = self.qb_test_input(
            {"input": {"a": 2, "b": 3, "scale": 10}},
            FLASH_BUILD_ARTIFACT_PATH=str(artifact),
            FLASH_RESOURCE_NAME="sync_worker",
            RUNPOD_ENDPOINT_ID="smoke-deployed",
        )
        if output != 50:
            raise SmokeError(f"deployed job answered {output!r}, expected 50")
        if "adding 2 + 3" not in self.last_output:
            raise SmokeError("the deployed function's print did not reach the worker's output")

    def lb_live(self) -> dict[str, Any]:
        """``flashrt-lb`` on a loopback port: /ping 204 then 200, /execute fixture 08 -> 18."""
        port = _free_port()
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
            statuses = _ping_until_ready(port, process)
            # Start-up runs in the background after uvicorn listens, so the first answers are
            # 204 (initializing) and then 200; nothing else is allowed (REFERENCE.md section 4).
            if _collapse(statuses) != [204, 200]:
                raise SmokeError(f"/ping answered {_collapse(statuses)}, expected 204 then 200")
            body = _fixture(self.fixtures, "08")
            status, payload = _request(port, "POST", "/execute", json.dumps(body).encode())
            if status != 200:
                raise SmokeError(f"/execute answered {status}: {payload!r}")
            response = json.loads(payload)
            if response.get("success") is not True:
                raise SmokeError(f"/execute failed: {response}")
            value = _unpickle(response["result"])
            if value != 18 or "adding 4 + 5" not in (response.get("stdout") or ""):
                raise SmokeError(f"/execute answered {value!r}, stdout {response.get('stdout')!r}")
            status, _ = _request(port, "GET", "/ping")
            if status != 200:
                raise SmokeError(f"/ping answered {status} after /execute")
        except SmokeError as exc:
            raise SmokeError(f"{exc}\nflashrt-lb output:\n{_tail(log_path.read_text())}") from exc
        finally:
            code = _stop(process)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is clean.
        if code not in (0, -signal.SIGTERM):
            raise SmokeError(f"flashrt-lb exited {code} on SIGTERM:\n{_tail(log_path.read_text())}")
        return {"ping": _collapse(statuses)}

    def report(self) -> None:
        total = sum(elapsed for _, elapsed in self.timings)
        print("[smoke] timings: " + ", ".join(f"{n} {t:.1f} s" for n, t in self.timings))
        print(f"[smoke] all steps passed in {total:.1f} s")


def _sdk_job_result(output: str) -> str | None:
    """The ``Job result: {...}`` the runpod SDK logs after a local job, as a Python literal.

    The SDK logs plain ``LEVEL | message`` lines, or JSON lines once RUNPOD_ENDPOINT_ID is set.
    """
    for line in output.splitlines():
        message = line
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                message = str(json.loads(line).get("message", ""))
        _, marker, result = message.partition("Job result: ")
        if marker:
            return result.strip()
    return None


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


def _request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60.0
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _ping_until_ready(port: int, process: subprocess.Popen[bytes]) -> list[int]:
    """Poll /ping from the moment the process starts until it answers 200; every answer seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + PING_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SmokeError(f"flashrt-lb exited {process.returncode} while starting")
        try:
            status, _ = _request(port, "GET", "/ping", timeout=5.0)
        except OSError:
            time.sleep(0.005)
            continue
        statuses.append(status)
        if status != 204:
            return statuses
        time.sleep(0.005)
    raise SmokeError(f"/ping did not answer 200 within {PING_DEADLINE_S:.0f} s: {statuses}")


def _collapse(statuses: list[int]) -> list[int]:
    collapsed: list[int] = []
    for status in statuses:
        if not collapsed or collapsed[-1] != status:
            collapsed.append(status)
    return collapsed


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, as the platform stops a container; SIGKILL the group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


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
    fixtures = Path(os.environ.get(FIXTURES_ENV, DEFAULT_FIXTURES))

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
            print(f"[smoke]   /ping answers seen: {seen['ping']}", flush=True)
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
