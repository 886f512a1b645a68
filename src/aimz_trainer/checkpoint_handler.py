"""The orbax item that holds a checkpoint's state (:mod:`aimz_trainer.checkpoint` describes the
format). Apart from :mod:`aimz_trainer.checkpoint` because its classes derive from orbax's,
whose import takes a quarter of a second: it is imported when a checkpoint is first written or
read, not by ``import aimz_trainer``."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from aimz_trainer.checkpoint import _ARRAYS_FILE

__all__ = ["NamedArraysHandler", "NamedArraysRestore", "NamedArraysSave"]


# A checkpoint's state is a few dozen small arrays, already on the host: orbax's
# tensorstore-backed StandardSave has a fixed CPU cost per save that an .npz does not (the
# README's checkpoint figures). The archive is built in memory and written in one call:
# np.savez seeks back into every member's header, a system call each on a file.
class NamedArraysHandler(ocp.CheckpointHandler):
    """An orbax item of named host arrays (``{"params/w_auto_loc": array, ...}``), written as
    one uncompressed ``.npz`` file that plain NumPy reads. The arrays are replicated, so only
    process 0 writes them."""

    def save(self, directory: Any, args: NamedArraysSave) -> None:  # type: ignore[override]
        if jax.process_index() == 0:
            archive = io.BytesIO()
            np.savez(archive, **args.arrays)
            (Path(directory) / _ARRAYS_FILE).write_bytes(archive.getbuffer())

    def restore(self, directory: Any, args: NamedArraysRestore | None = None) -> dict[str, np.ndarray]:  # type: ignore[override]
        with np.load(Path(directory) / _ARRAYS_FILE) as archive:
            return {name: archive[name] for name in archive.files}


@ocp.args.register_with_handler(NamedArraysHandler, for_save=True)
@dataclasses.dataclass
class NamedArraysSave(ocp.args.CheckpointArgs):
    """Save arguments of :class:`NamedArraysHandler`: ``{name: host array}``
    (:func:`~aimz_trainer.checkpoint.named_arrays`)."""

    arrays: Mapping[str, np.ndarray]


@ocp.args.register_with_handler(NamedArraysHandler, for_restore=True)
@dataclasses.dataclass
class NamedArraysRestore(ocp.args.CheckpointArgs):
    """Restore arguments of :class:`NamedArraysHandler` (nothing to say: the file has it all)."""
