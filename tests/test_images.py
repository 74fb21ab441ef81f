"""The image recipe says what the client expects (docs/contracts.md), without building it.

``nox -s smoke`` proves the CPU images' Python side by running it; these fast checks cover what
that does not run: the GPU stage's environment, the bake file's matrix, the pin files, the
interpreter check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
sys.path.insert(0, str(IMAGES))

import bake  # noqa: E402
import dockerfile  # noqa: E402
import pins  # noqa: E402
import podman  # noqa: E402
from procs import SmokeError  # noqa: E402

PROVIDED = ("runpod", "cloudpickle", "pydantic", "httpx", "aiohttp", "fastapi", "uvicorn", "uv")


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_queue_and_http_images_run_their_shell(accelerator: str) -> None:
    qb_env, qb_command = dockerfile.image_config(accelerator, "qb")
    lb_env, lb_command = dockerfile.image_config(accelerator, "lb")
    assert qb_command == ["flashrt-qb"]
    assert lb_command == ["flashrt-lb"]
    assert "PORT" not in qb_env
    assert lb_env["PORT"] == "80"


def test_only_gpu_images_use_hf_transfer() -> None:
    gpu_env, _ = dockerfile.image_config("gpu", "qb")
    cpu_env, _ = dockerfile.image_config("cpu", "qb")
    assert gpu_env["HF_HOME"] == "/hf-cache"
    assert gpu_env["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    # Set without hf_transfer installed, huggingface_hub refuses to download.
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in cpu_env
    assert "hf-transfer==" in pins.requirements_path("gpu").read_text()
    assert "hf-transfer==" not in pins.requirements_path("cpu").read_text()
    # torch for the image's own Python comes from the lock, on the GPU images only.
    for name in ("torch", "torchvision", "torchaudio"):
        assert re.search(rf"^{name}==", pins.requirements_path("gpu").read_text(), re.M)
        assert not re.search(rf"^{name}==", pins.requirements_path("cpu").read_text(), re.M)


def test_http_images_expose_port_80() -> None:
    text = (IMAGES / "Dockerfile").read_text()
    lb_stage = text.split("AS lb\n", 1)[1]
    assert re.search(r"^EXPOSE 80$", lb_stage, re.M)


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_pins_provide_what_deployed_artifacts_import(accelerator: str) -> None:
    text = pins.requirements_path(accelerator).read_text()
    for name in PROVIDED:
        assert re.search(rf"^{name}==", text, re.M), f"{name} is not pinned for {accelerator}"
    # The workspace packages come from the wheels, never from an index.
    assert not re.search(r"^flashrt", text, re.M)


def test_bake_file_builds_every_image_for_the_clients_pythons() -> None:
    """The matrix's versions are runpod-flash's own lists; each image is a matrix target."""
    from runpod_flash.core.resources import constants

    text = (IMAGES / "docker-bake.hcl").read_text()
    defaults = dict(re.findall(r'variable "(\w+)" \{[^}]*?default = "([^"]*)"', text, re.S))
    versions = defaults["PYTHON_VERSIONS"].split(",")
    assert versions == list(constants.GPU_PYTHON_VERSIONS) == list(constants.CPU_PYTHON_VERSIONS)
    assert defaults["TAG"] == "latest"  # the client's FLASH_IMAGE_TAG default
    for kind in bake.KINDS:
        body = re.search(rf'^target "{kind}" \{{(.*?)^\}}', text, re.S | re.M)
        assert body is not None, kind
        assert 'matrix   = { python = split(",", PYTHON_VERSIONS) }' in body.group(1)
    assert len(bake.expected()) == 16


def test_bake_checker_names_what_differs() -> None:
    """bake.problems, fed a --print document with one tag and one target wrong, says so."""
    printed: dict[str, Any] = {
        "group": {kind: {"targets": []} for kind in bake.KINDS},
        "target": bake.expected(),
    }
    for kind in bake.KINDS:
        printed["group"][kind]["targets"] = [
            n for n in printed["target"] if n.rsplit("-py", 1)[0] == kind
        ]
    printed["group"]["default"] = {"targets": list(bake.KINDS)}
    assert bake.problems(printed) == []
    printed["target"]["cpu-py3-11"]["tags"] = ["runpod/flash-cpu:py3.12-latest"]
    del printed["target"]["lb-py3-13"]
    found = bake.problems(printed)
    assert "missing target lb-py3-13" in found
    assert any(issue.startswith("cpu-py3-11: tags") for issue in found)


def test_bake_print_gives_every_image_for_every_python(tmp_path: Path) -> None:
    """The real buildx reads the file: 16 targets, tagged as the client asks (nox -s pythons
    runs this in a container on machines without buildx)."""
    buildx = bake.find_buildx()
    if buildx is None:
        pytest.skip("no buildx on PATH (nox -s pythons runs Debian's in a container)")
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "TAG", "PYTHON_VERSIONS")}
    done = subprocess.run(
        [*buildx, "bake", "-f", str(IMAGES / "docker-bake.hcl"), "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert bake.problems(bake.parse_print(done.stdout)) == []


def test_the_runtime_stage_checks_its_python_before_installing() -> None:
    runtime = (IMAGES / "Dockerfile").read_text().split(" AS runtime\n", 1)[1]
    check = runtime.index('check-python.sh python3 "${PYTHON_VERSION}"')
    assert check < runtime.index("install-runtime.sh")


def test_python_check_passes_the_tagged_version_and_refuses_another() -> None:
    script = IMAGES / "check-python.sh"
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    other = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
    done = subprocess.run(["sh", script, sys.executable, mine], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(["sh", script, sys.executable, other], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"tagged py{other} but its interpreter {sys.executable} is Python {mine}" in done.stderr
    done = subprocess.run(["sh", script, "/no/python", mine], capture_output=True, text=True)
    assert done.returncode == 1 and "no working Python at '/no/python'" in done.stderr


def test_image_tags_name_their_python() -> None:
    assert podman.image_python("localhost/flashrt-test/qb-cpu:py3.13-latest") == "3.13"
    assert podman.image_python("registry:5000/runpod/flash:py3.10-dev") == "3.10"
    with pytest.raises(SmokeError):
        podman.image_python("runpod/flash:latest")


def test_install_script_refuses_missing_inputs(tmp_path: Path) -> None:
    script = IMAGES / "install-runtime.sh"
    done = subprocess.run(["sh", script], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "usage:" in done.stderr
    requirements = pins.requirements_path("cpu")
    done = subprocess.run(
        ["sh", script, sys.executable, requirements, tmp_path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert f"no wheels in {tmp_path}" in done.stderr


def test_install_script_resolves_a_bare_interpreter_name(tmp_path: Path) -> None:
    """The Dockerfile passes ``python3``; uv must get its path, or it reads a version request."""
    script = IMAGES / "install-runtime.sh"
    requirements = pins.requirements_path("cpu")
    done = subprocess.run(
        ["sh", script, "no-such-python-here", requirements, tmp_path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "interpreter not found on PATH: no-such-python-here" in done.stderr
    (tmp_path / "flashrt_core-0-py3-none-any.whl").touch()
    # `echo` in uv's place shows the command line the script hands uv.
    done = subprocess.run(
        ["sh", script, "python3", requirements, tmp_path],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ["PATH"], "UV": "echo"},
    )
    assert done.returncode == 0, done.stderr
    python = done.stdout.split("--python ", 1)[1].split()[0]
    assert Path(python).is_absolute() and Path(python).name == "python3"
