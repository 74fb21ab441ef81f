# The four flashrt worker images, from images/Dockerfile. Run from the repository root:
#
#   docker buildx bake -f images/docker-bake.hcl                  # build all four
#   docker buildx bake -f images/docker-bake.hcl --push           # build and push
#   REGISTRY=ghcr.io/me/ TAG=dev docker buildx bake -f images/docker-bake.hcl cpu
#
# Every name and the tag are variables, settable from the environment at build time.

variable "REGISTRY" {
  # Prefix put before every image name, with its trailing slash ("ghcr.io/me/"); empty = Docker Hub.
  default = ""
}

variable "TAG" {
  # The client pulls py3.12-latest unless FLASH_IMAGE_TAG says otherwise.
  default = "py3.12-latest"
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

variable "GPU_BASE_IMAGE" {
  default = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
}

variable "CPU_BASE_IMAGE" {
  default = "python:3.12-slim"
}

variable "PLATFORMS" {
  # Comma-separated; the GPU base image is published for linux/amd64 only.
  default = "linux/amd64"
}

group "default" {
  targets = ["gpu", "cpu", "lb", "lb-cpu"]
}

target "_common" {
  context    = "."
  dockerfile = "images/Dockerfile"
  platforms  = split(",", PLATFORMS)
}

target "_gpu" {
  inherits = ["_common"]
  args = {
    BASE_IMAGE  = GPU_BASE_IMAGE
    ACCELERATOR = "gpu"
  }
}

target "_cpu" {
  inherits = ["_common"]
  args = {
    BASE_IMAGE  = CPU_BASE_IMAGE
    ACCELERATOR = "cpu"
  }
}

# Queue (QB) workers: flashrt-qb.
target "gpu" {
  inherits = ["_gpu"]
  target   = "qb"
  tags     = ["${REGISTRY}${GPU_IMAGE}:${TAG}"]
}

target "cpu" {
  inherits = ["_cpu"]
  target   = "qb"
  tags     = ["${REGISTRY}${CPU_IMAGE}:${TAG}"]
}

# HTTP (LB) workers: flashrt-lb on port 80.
target "lb" {
  inherits = ["_gpu"]
  target   = "lb"
  tags     = ["${REGISTRY}${LB_IMAGE}:${TAG}"]
}

target "lb-cpu" {
  inherits = ["_cpu"]
  target   = "lb"
  tags     = ["${REGISTRY}${CPU_LB_IMAGE}:${TAG}"]
}
