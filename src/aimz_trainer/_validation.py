"""Checks of argument values shared by every public entry point."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_int_at_least"]


def is_int_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (Python or NumPy; ``True``/``False`` are not counts) of at
    least ``minimum``.

    Example:
        >>> is_int_at_least(3, 1), is_int_at_least(True, 1), is_int_at_least(0, 1)
        (True, False, False)
    """
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum
