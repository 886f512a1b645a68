"""The device mesh and the shardings of batches and state on it.

Training and prediction share one 1-D :class:`jax.sharding.Mesh` whose single axis is named
``"data"``: minibatch rows are split across it and everything else is replicated. A batch
whose rows do not split evenly over the devices is padded to :func:`padded_batch_size` rows;
what the padding rows hold, and why they change nothing, is the business of whoever pads
(:mod:`aimz_trainer.data` for training, :mod:`aimz_trainer.prediction_plan` for prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aimz_trainer.errors import ConfigurationError

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "make_mesh",
    "padded_batch_size",
    "place_replicated",
    "record_shardings",
    "records_to_global",
    "replicated",
    "stacked_batch_sharding",
    "to_global_array",
]

DATA_AXIS = "data"


def make_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """Build the 1-D ``"data"`` mesh training and prediction run on.

    Args:
        devices: ``None`` for every device of every process, an ``int`` for the first that many
            devices, or an explicit sequence of devices.

    Returns:
        A mesh with one axis, ``"data"``.

    Example:
        >>> mesh = make_mesh(1)
        >>> mesh.axis_names, mesh.size
        (('data',), 1)
    """
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ConfigurationError(
                f"devices={devices} but {len(available)} device(s) are available; pass an int "
                f"between 1 and {len(available)}, a list of devices, or None for all of them."
            )
        chosen = available[: int(devices)]
    else:
        # Neither a float nor a string is a count or a collection of devices.
        chosen = list(devices) if isinstance(devices, Iterable) and not isinstance(devices, str) else []
        if not chosen or not all(isinstance(d, jax.Device) for d in chosen):
            raise ConfigurationError(
                f"devices must be None, an int or a non-empty sequence of jax.Device; got {devices!r}."
            )
        if len(set(chosen)) < len(chosen):
            raise ConfigurationError(f"devices must list each device once; got {devices!r}.")
    return Mesh(np.asarray(chosen), (DATA_AXIS,))


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """``batch_size`` rounded up to a multiple of ``num_devices``: the rows a batch has on the
    mesh, every device holding as many.

    Example:
        >>> padded_batch_size(100, 3), padded_batch_size(100, 4), padded_batch_size(2, 3)
        (102, 100, 3)
    """
    return -(-batch_size // num_devices) * num_devices


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of arrays every device holds whole (SVI state, device-resident data)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (axis 0) split over the ``"data"`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """A stack of K batches: axis 0 counts steps, rows (axis 1) are split over ``"data"``."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def to_global_array(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """Assemble one global array from this process's part of it (its rows, or all of it when
    the sharding replicates)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def place_replicated(arrays: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Replicate the arrays on every device of the mesh, in JAX's canonical dtypes."""
    sharding = replicated(mesh)
    placed = {}
    for key, array in arrays.items():
        dtype = jax.dtypes.canonicalize_dtype(array.dtype)
        if isinstance(array, jax.Array):
            placed[key] = jax.device_put(array.astype(dtype), sharding)
        else:
            placed[key] = to_global_array(np.asarray(array, dtype=dtype), sharding, array.shape)
    return placed


def records_to_global(mesh: Mesh, batch_size: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``put(record)``: a Grain record (this process's columns of each stacked batch) as global
    arrays of ``batch_size`` columns split over the mesh; scalars (counts) replicated."""
    stacked, rep = stacked_batch_sharding(mesh), replicated(mesh)

    def put(local: Any) -> jax.Array:
        local = np.asarray(local)
        if local.ndim == 0:
            return to_global_array(local, rep, ())
        return to_global_array(local, stacked, (local.shape[0], batch_size, *local.shape[2:]))

    return lambda record: jax.tree.map(put, record)


def record_shardings(mesh: Mesh, record: Mapping[str, Any]) -> dict[str, NamedSharding]:
    """The shardings of a record's fields as compiled functions take them: stacked batches
    split by rows, the step count replicated."""
    stacked, rep = stacked_batch_sharding(mesh), replicated(mesh)
    return {key: rep if key == "num_steps" else stacked for key in record}
