"""Scratch directories: where stores written without an ``output_dir`` live.

:class:`ScratchDirectory` is the life cycle of stores written without an ``output_dir``: a
directory created on first use, removed by ``cleanup()``, when its owner is garbage-collected
and at interpreter exit. Its owner holds an exclusive lock on a file in it for as long as the
directory is in use; the kernel releases the lock when the process dies, however it dies, so
directories of processes that died without cleaning up (SIGKILL) are those whose lock can be
taken, and are swept the next time one is created. A process ID would not do: where the
temporary directory is shared across PID namespaces (containers, some CI runners) the owner's
ID means nothing, or another process, in the sweeper's namespace. A directory without a lock
file (made by an earlier version) is left alone, as nothing tells whether its owner lives.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

__all__ = ["ScratchDirectory", "sweep_scratch"]


class ScratchDirectory:
    """A temporary directory created on first use and removed by :meth:`cleanup`, when the
    object is garbage-collected, or at interpreter exit.

    While it exists this process holds an exclusive lock on its :attr:`LOCK` file, which tells
    :func:`sweep_scratch` in any process that it is in use.

    Example:
        >>> scratch = ScratchDirectory()
        >>> path = scratch.path
        >>> path.is_dir()
        True
        >>> scratch.cleanup(); path.exists()
        False
    """

    PREFIX = "aimz-trainer-scratch-"
    LOCK = "owner.lock"

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        self._parent = Path(parent or tempfile.gettempdir())
        self._path: Path | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def path(self) -> Path:
        if self._path is None or not self._path.exists():
            self.cleanup()  # a directory removed behind our back: release its lock
            sweep_scratch(self._parent)
            self._path, lock = _create_locked(self._parent, f"{self.PREFIX}{os.getpid()}-")
            self._finalizer = weakref.finalize(self, _remove_and_unlock, self._path, lock)
        return self._path

    @property
    def created(self) -> bool:
        return self._path is not None and self._path.exists()

    def cleanup(self) -> None:
        """Remove the directory now (a no-op when it was never created or is gone)."""
        if self._finalizer is not None:
            self._finalizer()


def _create_locked(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new directory in ``parent`` and the descriptor of the exclusive lock on its
    :attr:`ScratchDirectory.LOCK` file, held until the descriptor is closed.

    The lock file gets its name only once it is locked: a sweep that opened it in between
    would take the lock and remove a directory in use."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock, unnamed = tempfile.mkstemp(dir=path, prefix=".lock-")
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(unnamed, path / ScratchDirectory.LOCK)
    return path, lock


def _remove_and_unlock(path: Path, lock: int) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:  # after: a sweep must not find the directory half removed and unlocked
        os.close(lock)


def sweep_scratch(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove the scratch directories in ``parent`` whose owner is gone; return them.

    An owner holds the lock on its directory's :attr:`ScratchDirectory.LOCK` file until it
    removes the directory, and the kernel releases it when the owner dies, in whatever PID
    namespace it ran: a lock this process can take is the mark of a dead owner. A directory
    without a lock file (made by a version before the locks) is kept: nothing tells whether
    its owner lives, and removing a live process's stores would lose them. So is one named
    with this process's ID: where ``flock`` is emulated by per-process locks (NFS), this
    process would be granted its own lock again.
    """
    removed = []
    mine = f"{ScratchDirectory.PREFIX}{os.getpid()}-"
    for entry in Path(parent).glob(f"{ScratchDirectory.PREFIX}*"):
        if entry.is_dir() and not entry.name.startswith(mine) and _remove_if_abandoned(entry):
            removed.append(entry)
    return removed


def _remove_if_abandoned(directory: Path) -> bool:
    try:
        lock = os.open(directory / ScratchDirectory.LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or not ours to open): kept
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its owner lives
        os.close(lock)
        return False
    _remove_and_unlock(directory, lock)
    return True
