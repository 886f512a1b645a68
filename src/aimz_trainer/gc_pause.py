"""Python's cyclic garbage collector kept off a run's path: held off while programs are
traced, and kept away from what a command's process imported.

Tracing a model allocates objects by the hundred thousand; each few hundred of them start a
collection, and each few of those a full one, which walks every object the process holds (jax,
numpyro and the rest: some 250,000). Held off while programs are traced, the collector runs
once they are: what the traces left behind is collected then, not lost. The command's process
freezes what its imports made (they live as long as the process) once they are done: the full
collections that still come walk the run's own objects only.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["freeze_imported", "gc_paused"]

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


def freeze_imported() -> None:
    """Keep the cyclic collector off every object the process holds now, for good
    (:func:`gc.freeze`): for the ``aimz-trainer`` command's process, once its imports are done.
    Frozen objects are still freed when their last reference goes; cyclic garbage made before
    the call is not collected.

    Example:
        >>> import gc, subprocess, sys
        >>> probe = "import gc; from aimz_trainer.gc_pause import freeze_imported; freeze_imported(); "
        >>> probe += "print(gc.get_freeze_count() > 0, freeze_imported in gc.get_objects())"
        >>> subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()
        ['True', 'False']
    """
    gc.freeze()
