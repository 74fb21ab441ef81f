# The flashrt worker images, from images/Dockerfile: four images (gpu, cpu, lb, lb-cpu), each for
# every Python the client asks for, tagged as it asks: py<version>-<TAG>. Run from the repository
# root:
#
#   docker buildx bake -f images/docker-bake.hcl                  # all sixteen
#   docker buildx bake -f images/docker-bake.hcl cpu              # cpu for every Python
#   docker buildx bake -f images/docker-bake.hcl cpu-py3-13       # one image
#   REGISTRY=ghcr.io/me/ TAG=dev docker buildx bake -f images/docker-bake.hcl --push
#
# Every name and the tag are variables, settable from the environment at build time.

variable "REGISTRY" {
  # Prefix put before every image name, with its trailing slash ("ghcr.io/me/"); empty = Docker Hub.
  default = ""
}

variable "TAG" {
  # The tag's suffix: the client pulls py<python_version>-latest unless FLASH_IMAGE_TAG says otherwise.
  default = "latest"
}

variable "GPU_IMAGE" {
  default = "runpod/flash"
}

variable "CPU_IMAGE" {
  default = "runpod/flash-cpu"
}

variable "LB_IMAGE" {
  default = "runpod/flash-lb"
}

variable "CPU_LB_IMAGE" {
  default = "runpod/flash-lb-cpu"
}

variable "PYTHON_VERSIONS" {
  # Comma-separated: the client's GPU_PYTHON_VERSIONS and CPU_PYTHON_VERSIONS (runpod-flash 1.21).
  default = "3.10,3.11,3.12,3.13"
}

variable "BASE_IMAGE_PREFIX" {
  # Every image is based on <prefix><python>-slim; the GPU ones add torch from uv.lock.
  default = "python:"
}

variable "PLATFORMS" {
  # Comma-separated; the GPU images' torch and CUDA wheels are pinned for linux/amd64.
  default = "linux/amd64"
}

group "default" {
  targets = ["gpu", "cpu", "lb", "lb-cpu"]
}

# Each target below is one image for every Python: "cpu" builds cpu-py3-10 ... cpu-py3-13.
target "_common" {
  context    = "."
  dockerfile = "images/Dockerfile"
  platforms  = split(",", PLATFORMS)
}

target "_gpu" {
  inherits = ["_common"]
  args = {
    ACCELERATOR = "gpu"
  }
}

target "_cpu" {
  inherits = ["_common"]
  args = {
    ACCELERATOR = "cpu"
  }
}

# Queue (QB) workers: flashrt-qb.
target "gpu" {
  name     = "gpu-py${replace(python, ".", "-")}"
  matrix   = { python = split(",", PYTHON_VERSIONS) }
  inherits = ["_gpu"]
  target   = "qb"
  args     = { PYTHON_VERSION = python, BASE_IMAGE = "${BASE_IMAGE_PREFIX}${python}-slim" }
  tags     = ["${REGISTRY}${GPU_IMAGE}:py${python}-${TAG}"]
}

target "cpu" {
  name     = "cpu-py${replace(python, ".", "-")}"
  matrix   = { python = split(",", PYTHON_VERSIONS) }
  inherits = ["_cpu"]
  target   = "qb"
  args     = { PYTHON_VERSION = python, BASE_IMAGE = "${BASE_IMAGE_PREFIX}${python}-slim" }
  tags     = ["${REGISTRY}${CPU_IMAGE}:py${python}-${TAG}"]
}

# HTTP (LB) workers: flashrt-lb on port 80.
target "lb" {
  name     = "lb-py${replace(python, ".", "-")}"
  matrix   = { python = split(",", PYTHON_VERSIONS) }
  inherits = ["_gpu"]
  target   = "lb"
  args     = { PYTHON_VERSION = python, BASE_IMAGE = "${BASE_IMAGE_PREFIX}${python}-slim" }
  tags     = ["${REGISTRY}${LB_IMAGE}:py${python}-${TAG}"]
}

target "lb-cpu" {
  name     = "lb-cpu-py${replace(python, ".", "-")}"
  matrix   = { python = split(",", PYTHON_VERSIONS) }
  inherits = ["_cpu"]
  target   = "lb"
  args     = { PYTHON_VERSION = python, BASE_IMAGE = "${BASE_IMAGE_PREFIX}${python}-slim" }
  tags     = ["${REGISTRY}${CPU_LB_IMAGE}:py${python}-${TAG}"]
}
