#!/bin/sh
# Install flashrt's runtime into one Python interpreter: the pinned requirements of one image
# variant (requirements-cpu.txt or requirements-gpu.txt, exported from uv.lock by pins.py) and
# the flashrt wheels. The image's runtime stage (Dockerfile) and `nox -s smoke` (smoke.py) both
# run this script, so what CI proves is exactly what the images install.
#
#   usage: install-runtime.sh PYTHON REQUIREMENTS WHEEL_DIR
#   env:   UV (default: uv on PATH); UV_NO_CACHE=1 in the image build
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 PYTHON REQUIREMENTS WHEEL_DIR" >&2
    exit 2
fi
python=$1
requirements=$2
wheels=$3

# A bare name (the Dockerfile passes python3) is looked up on PATH: uv reads "python3" as a
# version request and then insists on a virtual environment, so it must get the program's path.
case $python in
    */*) ;;
    *)
        if ! python=$(command -v "$python"); then
            echo "$0: interpreter not found on PATH: $1" >&2
            exit 1
        fi
        ;;
esac

if [ ! -f "$requirements" ]; then
    echo "$0: requirements file not found: $requirements" >&2
    exit 1
fi
set -- "$wheels"/*.whl
if [ ! -e "$1" ]; then
    echo "$0: no wheels in $wheels" >&2
    exit 1
fi

# --no-build: every pinned package must come as a wheel (the slim image has no compiler, and a
# wheel is what smoke tested). Hashes in the requirements file are verified; our local wheels
# have none, which uv accepts unless --require-hashes is given.
exec "${UV:-uv}" pip install \
    --python "$python" \
    --no-build \
    --compile-bytecode \
    --requirement "$requirements" \
    "$@"
