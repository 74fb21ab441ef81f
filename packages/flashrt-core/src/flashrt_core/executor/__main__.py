"""Entry point of the executor process (spawned by the supervisor, never run by hand)."""

from __future__ import annotations

import sys

from .server import main

sys.exit(main())
