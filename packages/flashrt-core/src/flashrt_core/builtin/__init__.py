"""Plugins that ship with flashrt-core; all ``trylast`` so third-party plugins win."""
