"""uv, pip, apt-get and nala dependency installers for flashrt.

Two plugins, registered through the ``flashrt`` entry-point group (each names its class, so
every runtime and executor gets an instance of its own, which owns its installer and settings):
:class:`.python.PythonInstallerPlugin` claims a request's ``dependencies``,
:class:`.system.SystemInstallerPlugin` its ``system_dependencies``. Both are ``trylast``, so a
third-party plugin that claims a kind first (a conda installer, say) replaces that one alone.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
