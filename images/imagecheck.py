"""``nox -s image``: build the worker images with a real engine and run them as RunPod would.

Podman on a stand-in base (see podman.py) builds the CPU ``qb`` and ``lb`` targets and the GPU
path (``ACCELERATOR=gpu``, torch included), tagged ``py3.11-latest`` as the base's Python is, then:

* each image's ``python3`` is the version its tag names;

* ``qb --test_input`` on fixtures 01 and 07 (CPU and GPU builds), and on a real ``flash build``
  artifact mounted read-only at ``FLASH_BUILD_ARTIFACT_PATH``;
* ``qb`` in RunPod's production job loop (``--network=host``, ``RUNPOD_WEBHOOK_*``) against the
  fake control plane of tests/fake_runpod.py on 127.0.0.1, driven by the real runpod-flash client;
  when the image's flashrt-core has ``flashrt_core.supervisor``, a request that calls
  ``os._exit(3)`` must fail clearly and the same container answer the next one;
* ``lb`` on a published loopback port: ``/ping`` 204 then 200, ``/execute`` fixture 08;
* ``podman stop`` of both: a clean exit within the platform's grace period.

Needs root, Debian's apt and PyPI. ``--keep`` keeps the work directory and the images.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

IMAGES = Path(__file__).resolve().parent
ROOT = IMAGES.parent
sys.path.insert(0, str(IMAGES))
sys.path.insert(0, str(ROOT / "tests"))

import checks  # noqa: E402  (images/ is not a package)
import podman  # noqa: E402
import wheels  # noqa: E402
from dockerfile import image_config  # noqa: E402
from procs import SmokeError, Timings, free_port, run, tail  # noqa: E402

if TYPE_CHECKING:
    from fake_runpod import FakeRunPod

#: Tagged as the client names images, for the stand-in base's Python (bookworm: 3.11).
PYTHON = podman.SUITES["bookworm"]
TAGS = {
    "qb": f"localhost/flashrt-test/qb-cpu:py{PYTHON}-latest",
    "lb": f"localhost/flashrt-test/lb-cpu:py{PYTHON}-latest",
    "gpu": f"localhost/flashrt-test/qb-gpu:py{PYTHON}-latest",
}
ARTIFACT_PATH = "/root/.runpod/artifact.tar.gz"
#: How long the platform waits after SIGTERM before it kills (Docker's and podman's default).
STOP_GRACE_S = 10
ENDPOINT = "image-qb"
EXIT_CODE = """\
def die():
    import os
    os._exit(3)
"""


class ImageCheck(Timings):
    """One ``nox -s image`` run: its work directory and engine."""

    def __init__(self, work: Path) -> None:
        super().__init__("image")
        self.work = work
        self.engine = podman.Podman()

    def build(self) -> None:
        for name, (target, accelerator) in {
            "qb": ("qb", "cpu"),
            "lb": ("lb", "cpu"),
            "gpu": ("qb", "gpu"),
        }.items():
            seconds = self.engine.build(TAGS[name], target, accelerator)
            self.note(
                f"built {TAGS[name]} ({target}, ACCELERATOR={accelerator}) in {seconds:.0f} s"
            )

    def pythons(self) -> None:
        """Each image runs the Python its tag names (the build checked it too)."""
        for tag in TAGS.values():
            self.note(f"{tag}: Python {self.engine.check_python(tag)}")

    def sizes(self) -> None:
        """What flashrt adds on top of its base, layer by layer."""
        for name in ("qb", "gpu"):
            layers = self.engine.added_layers(TAGS[name])
            total = sum(size for size, _ in layers)
            self.note(f"{TAGS[name]} adds {total / 1e6:.1f} MB on the base:")
            for size, created_by in layers:
                self.note(f"  {size / 1e6:9.1f} MB  {' '.join(created_by.split())[:90]}")

    def contents(self) -> None:
        """Both shells, uv, and every module deployed artifacts expect, importable."""
        for name, accelerator in (("qb", "cpu"), ("gpu", "gpu")):
            modules = wheels.PROVIDED_MODULES + (wheels.GPU_MODULES if accelerator == "gpu" else ())
            probe = (
                f"import {', '.join(modules)}; import json, os; print(json.dumps(dict(os.environ)))"
            )
            out = self.podman_run(TAGS[name], ["python", "-c", probe])
            environ: dict[str, str] = json.loads(out.strip().splitlines()[-1])
            image_env, _ = image_config(accelerator, "qb")
            for key, value in image_env.items():
                if environ.get(key) != value:
                    raise SmokeError(f"{TAGS[name]}: {key}={environ.get(key)!r}, not {value!r}")
            self.podman_run(TAGS[name], ["sh", "-c", "command -v flashrt-qb flashrt-lb uv"])

    def podman_run(self, image: str, command: list[str], *flags: str) -> str:
        done = run(
            ["podman", "run", "--rm", *flags, image, *command], env=self.engine.env, timeout=180
        )
        return done.stdout + done.stderr

    def test_input(self, name: str, job: dict[str, Any], *flags: str) -> tuple[Any, str]:
        """The image's CMD with ``--test_input JOB``: (the job's output, what it printed)."""
        _, command = image_config("gpu" if name == "gpu" else "cpu", "qb")
        output = self.podman_run(TAGS[name], [*command, "--test_input", json.dumps(job)], *flags)
        return checks.test_input_output(output), output

    def qb_fixtures(self) -> None:
        for name in ("qb", "gpu"):
            for prefix in ("01", "07"):
                response, _ = self.test_input(name, checks.fixture(prefix))
                checks.check_add_response(response, expected=50, printed="adding 2 + 3")

    def qb_deployed(self) -> None:
        version = self.podman_run(
            TAGS["qb"], ["python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        ).split()[-1]
        artifact = checks.build_deployed_artifact(
            self.work / "project", self.work / "home", python_version=version
        )
        output, log = self.test_input(
            "qb",
            checks.DEPLOYED_JOB,
            f"--volume={artifact}:{ARTIFACT_PATH}:ro",
            f"--env=FLASH_BUILD_ARTIFACT_PATH={ARTIFACT_PATH}",
            f"--env=FLASH_RESOURCE_NAME={checks.DEPLOYED_RESOURCE}",
            "--env=RUNPOD_ENDPOINT_ID=image-deployed",
        )
        checks.check_deployed_output(output, log)

    def has_supervisor(self) -> bool:
        probe = (
            "import importlib.util as u; print(u.find_spec('flashrt_core.supervisor') is not None)"
        )
        return self.podman_run(TAGS["qb"], ["python", "-c", probe]).split()[-1] == "True"

    def qb_job_loop(self) -> None:
        """The production loop in the container, the real client on the host, one fake between."""
        from fake_runpod import FakeRunPod

        with FakeRunPod() as fake:
            env = {**fake.worker_env(ENDPOINT, worker_id=f"{ENDPOINT}-worker")}
            env["RUNPOD_LOG_LEVEL"] = "INFO"
            name = "flashrt-image-qb"
            with self.engine.detached(name, TAGS["qb"], ["--network=host"], env):
                try:
                    self._wait_polling(fake, name)
                    client = _Client(fake, self.work / "client")
                    self._client_calls(client)
                    if self.has_supervisor():
                        self._exit_survived(fake, client, name)
                    else:
                        self.note(
                            "SKIP os._exit check: the image's flashrt-core has no"
                            " flashrt_core.supervisor (user code runs in the worker process)"
                        )
                    self._stop_cleanly(name)
                except SmokeError as exc:
                    logs = run(["podman", "logs", name], env=self.engine.env, timeout=30)
                    raise SmokeError(
                        f"{exc}\nworker output:\n{tail(logs.stdout + logs.stderr)}"
                    ) from exc

    def _wait_polling(self, fake: FakeRunPod, name: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with fake.cond:
                if any(take["worker"] == f"{ENDPOINT}-worker" for take in fake.takes):
                    return
            if not self.engine.state(name).get("Running"):
                raise SmokeError("the qb container exited before it polled for jobs")
            time.sleep(0.2)
        raise SmokeError(f"the qb container did not poll for jobs within {timeout:.0f} s")

    def _client_calls(self, client: _Client) -> None:
        functions = client.functions
        for fn, args, kwargs, expected in (
            (functions.add, (2, 3), {"scale": 10}, 50),
            (functions.uses_local_module, (7,), {}, 21),
        ):
            client.flash.seed(fn, ENDPOINT)
            value = asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 90))
            if value != expected:
                raise SmokeError(f"the client got {value!r} from {fn.__name__}, not {expected!r}")

    def _exit_survived(self, fake: FakeRunPod, client: _Client, name: str) -> None:
        """os._exit(3) in user code: a failed request, then the same container answers."""
        pid = self.engine.state(name)["Pid"]
        request = {
            "function_name": "die",
            "function_code": EXIT_CODE,
            "args": [],
            "kwargs": {},
            "serialization_format": "json",
        }
        status = fake.wait(fake.submit(ENDPOINT, request), 90)
        output = status.get("output") or {}
        error = str(output.get("error") or status.get("error") or "")
        if status.get("status") == "COMPLETED" and output.get("success") is not False:
            raise SmokeError(f"a request that calls os._exit(3) did not fail: {status}")
        if "exit" not in error.lower():
            raise SmokeError(f"os._exit(3) failed without saying it exited: {status}")
        self._client_calls(client)
        state = self.engine.state(name)
        if not state.get("Running") or state["Pid"] != pid:
            raise SmokeError(f"the qb container did not survive os._exit in user code: {state}")
        self.note(f"os._exit(3) answered: {error.splitlines()[0][:100]}")

    def _stop_cleanly(self, name: str) -> None:
        started = time.monotonic()
        self.engine("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
        self._check_stop(name, self.engine.state(name).get("ExitCode"), time.monotonic() - started)

    def _check_stop(self, name: str, code: object, elapsed: float) -> None:
        # 0, or 143 (the process re-raised SIGTERM after shutting down); 137 means killed.
        if code not in (0, 143) or elapsed >= STOP_GRACE_S:
            raise SmokeError(
                f"podman stop: exit {code} after {elapsed:.1f} s (grace {STOP_GRACE_S} s)"
            )
        self.note(f"{name}: exit {code} {elapsed:.1f} s after podman stop")

    def lb(self) -> None:
        """lb on a published loopback port, started in the foreground so /ping 204 is seen."""
        port = free_port()
        name = "flashrt-image-lb"
        self.engine.remove(name)
        log_path = self.work / "lb.log"
        with log_path.open("wb") as log:
            process = self.engine.popen(
                ["run", "--rm", "--name", name, f"--publish=127.0.0.1:{port}:80", TAGS["lb"]], log
            )
        try:
            seen = checks.check_lb(port, process)
            self.note(f"/ping answers seen: {seen}")
            started = time.monotonic()
            self.engine("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
            code = process.wait(30)
            self._check_stop(name, code, time.monotonic() - started)
        except SmokeError as exc:
            raise SmokeError(f"{exc}\nflashrt-lb output:\n{tail(log_path.read_text())}") from exc
        finally:
            self.engine.remove(name)
            with contextlib.suppress(Exception):
                process.wait(30)


class _Client:
    """The real runpod-flash client in this process, aimed at the fake (docs/contracts.md)."""

    def __init__(self, fake: FakeRunPod, workdir: Path) -> None:
        from e2e_support import FlashClient, load_client_functions

        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)  # the client keeps its resource cache in ./.flash
        os.environ.update(
            RUNPOD_ENDPOINT_BASE_URL=fake.api_base,
            RUNPOD_URL_MIXED_OK="1",
            RUNPOD_FLASH_SILENCE_DEPRECATION="1",
            FLASH_IS_LIVE_PROVISIONING="true",
        )
        for name in ("RUNPOD_API_KEY", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID"):
            os.environ.pop(name, None)
        import runpod
        import runpod_flash.core.resources.cloud  # noqa: F401  (its import resets runpod.api_key)

        runpod.api_key = "fake-client-key"
        runpod.endpoint_url_base = fake.api_base
        self.flash = FlashClient(fake)
        self.functions = load_client_functions()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the work dir and the images")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("[image] SKIP: needs root (apt-get, podman with runc)", file=sys.stderr)
        return 0
    work = Path(tempfile.mkdtemp(prefix="flashrt-image-"))
    check = ImageCheck(work)
    here = Path.cwd()
    try:
        with check.step("podman, runc and mmdebstrap installed"):
            podman.ensure_tools()
        with check.step("stand-in base image"):
            made = check.engine.ensure_base()
            check.note(f"{podman.BASE_IMAGE} {'made' if made else 'cached'}")
        with check.step("podman build: qb, lb (cpu), qb (gpu)"):
            check.build()
        with check.step("each image's Python is the one its tag names"):
            check.pythons()
        with check.step("layer sizes"):
            check.sizes()
        with check.step("image contents and ENV"):
            check.contents()
        with check.step("qb --test_input, fixtures 01 and 07 (cpu, gpu)"):
            check.qb_fixtures()
        with check.step("qb --test_input, flash build artifact mounted read-only"):
            check.qb_deployed()
        with check.step("qb in the job loop, real client, fake control plane; podman stop"):
            check.qb_job_loop()
        with check.step("lb: /ping 204 then 200, /execute fixture 08; podman stop"):
            check.lb()
        check.report()
    except SmokeError as exc:
        print(f"[image] FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        os.chdir(here)
        if args.keep:
            print(f"[image] kept {work} and the images {sorted(TAGS.values())}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(SmokeError):
                check.engine("rmi", "--force", *TAGS.values())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
