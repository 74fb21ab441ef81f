"""The image recipe says what the client expects (REFERENCE.md section 7), without building it.

``nox -s smoke`` proves the CPU images' Python side by running it; these fast checks cover what
that does not run: the GPU stage's environment, the bake file's four targets, the pin files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
sys.path.insert(0, str(IMAGES))

import dockerfile  # noqa: E402
import pins  # noqa: E402

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


def test_bake_file_has_the_four_images_under_settable_names() -> None:
    bake = (IMAGES / "docker-bake.hcl").read_text()
    defaults = dict(re.findall(r'variable "(\w+)" \{[^}]*?default = "([^"]*)"', bake, re.S))
    assert defaults["TAG"] == "py3.12-latest"
    assert defaults["GPU_BASE_IMAGE"] == "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
    assert defaults["CPU_BASE_IMAGE"] == "python:3.12-slim"
    targets = {
        name: body for name, body in re.findall(r'^target "([\w-]+)" \{(.*?)^\}', bake, re.S | re.M)
    }
    expected = {
        "gpu": ("qb", "_gpu", "GPU_IMAGE", "runpod/flash"),
        "cpu": ("qb", "_cpu", "CPU_IMAGE", "runpod/flash-cpu"),
        "lb": ("lb", "_gpu", "LB_IMAGE", "runpod/flash-lb"),
        "lb-cpu": ("lb", "_cpu", "CPU_LB_IMAGE", "runpod/flash-lb-cpu"),
    }
    for name, (stage, parent, variable, image) in expected.items():
        body = targets[name]
        assert f'target   = "{stage}"' in body
        assert f'inherits = ["{parent}"]' in body
        assert f'"${{REGISTRY}}${{{variable}}}:${{TAG}}"' in body
        assert defaults[variable] == image
    assert 'ACCELERATOR = "gpu"' in targets["_gpu"]
    assert "GPU_BASE_IMAGE" in targets["_gpu"]
    assert 'ACCELERATOR = "cpu"' in targets["_cpu"]
    assert "CPU_BASE_IMAGE" in targets["_cpu"]


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
