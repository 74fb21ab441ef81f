"""``python -m flashrt_core`` is the ``flashrt`` command."""

import sys

from .cli import main

sys.exit(main())
