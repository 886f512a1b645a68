"""Python's cyclic garbage collector held off while programs are traced.

Tracing a model allocates objects by the hundred thousand; each few hundred of them start a
collection, and each few of those a full one, which walks every object the process holds (jax,
numpyro and the rest: some 250,000). Held off while programs are traced, the collector runs
once they are: what the traces left behind is collected then, not lost.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

_lock = threading.Lock()
_holders = 0  # the gc_paused blocks open in the process, on any thread
_enabled_before = False  # whether the collector ran before the first of them


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic collector off inside the block; on leaving the last such block open in the
    process (blocks may nest, and overlap on several threads), turn it back on if it was on
    when the first one opened. A collector the user turned off stays off.

    Example:
        >>> import gc
        >>> with gc_paused():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    global _holders, _enabled_before
    with _lock:
        if _holders == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _enabled_before:
                gc.enable()
