#!/bin/sh
# Fail unless PYTHON is Python VERSION (major.minor). Every image is tagged py<VERSION>-...: the
# client picks it by that tag, so a base image with another interpreter must fail the build,
# not ship under a name that lies. The Dockerfile runs this first in the runtime stage.
#
#   usage: check-python.sh PYTHON VERSION
set -eu

if [ "$#" -ne 2 ] || [ -z "$2" ]; then
    echo "usage: $0 PYTHON VERSION" >&2
    exit 2
fi
if ! found=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "$0: no working Python at '$1': the image is tagged py$2 and must have Python $2" >&2
    exit 1
fi
if [ "$found" != "$2" ]; then
    echo "$0: the image is tagged py$2 but its interpreter $1 is Python $found" \
        "(set PYTHON_VERSION and BASE_IMAGE together)" >&2
    exit 1
fi
echo "Python $found, as the tag py$2 says"
