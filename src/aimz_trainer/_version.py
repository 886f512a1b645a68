"""The installed library's version, for the metadata of checkpoints and prediction stores."""

from __future__ import annotations

import functools
import importlib.metadata

__all__ = ["library_version"]


@functools.cache
def library_version() -> str:
    """The ``aimz-trainer`` distribution's version (``"unknown"`` when run from a bare tree)."""
    try:
        return importlib.metadata.version("aimz-trainer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
