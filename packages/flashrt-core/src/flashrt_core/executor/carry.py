"""Placeholder until the carry-over module lands."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["preload"]


def preload(modules: Mapping[str, str]) -> list[str]:
    """Import ``modules`` (name -> origin) ahead of need."""
    return []
