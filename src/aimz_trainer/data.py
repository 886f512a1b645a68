"""The Grain input pipeline: validated arrays -> per-epoch shuffled batches -> chunks of K steps.

Each Grain record is one *chunk*: the row indices of K consecutive minibatches, already cut to
this JAX process's share of every global batch. Two placements consume them:

* ``"device"``: the arrays live on the devices (replicated) and the compiled step gathers the
  rows itself, so the host only ships small index arrays.
* ``"host"``: the arrays stay in host memory; a Grain ``map`` gathers the rows of a whole chunk
  at once (never row by row) on Grain's prefetch threads.

Shuffling is a NumPy permutation seeded by ``(seed, epoch)``: a new order every epoch, the
same order for the same seed, independent of the device and process count. Rows inside a batch
are sorted (the batch is a set; sorted gathers are cache friendly).

The last partial batch (``n % batch_size`` rows) is, by default, completed with the first rows
of the same epoch's permutation, so every row is seen at least once per epoch and every step
has the same shape; with ``drop_last=True`` it is dropped instead (a different remainder each
epoch, since the order changes). Either way no step ever has another batch shape.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grain
import jax
import numpy as np

from aimz_trainer.errors import ConfigurationError, DataError

__all__ = [
    "ChunkSource",
    "FitPlan",
    "Placement",
    "device_data_budget",
    "make_chunk_loader",
    "resolve_placement",
    "validate_batch_size",
    "validate_data",
]

Placement = Literal["auto", "device", "host"]
ArrayLike = np.ndarray | jax.Array

_NUMERIC_KINDS = "biuf"


def validate_data(data: Any, *, name: str = "train_data") -> tuple[dict[str, ArrayLike], int]:
    """Check that ``data`` maps keyword names to numeric arrays of one common length.

    Returns:
        The arrays (NumPy arrays stay NumPy, JAX arrays stay JAX; anything else array-like is
        converted with ``np.asarray``) and their common length ``n``.
    """
    if not isinstance(data, Mapping):
        raise DataError(
            f"{name} must be a mapping from the model's keyword names to arrays, e.g. "
            f"{{'X': X, 'y': y}}; got {type(data).__name__}."
        )
    if not data:
        raise DataError(f"{name} is empty: pass at least one array, e.g. {{'X': X}}.")
    arrays: dict[str, ArrayLike] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise DataError(f"{name} keys must be keyword names (identifiers); got {key!r}.")
        array = value if isinstance(value, np.ndarray | jax.Array) else np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise DataError(
                f"{name}[{key!r}] has dtype {array.dtype}; expected a boolean, integer or floating-point array."
            )
        if array.ndim == 0:
            raise DataError(f"{name}[{key!r}] is a scalar; expected an array with one row per observation.")
        arrays[key] = array
    lengths = {key: int(array.shape[0]) for key, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{name} arrays must have the same number of rows; got lengths {lengths}.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DataError(f"{name} has no rows: every array has length 0.")
    return arrays, n


def validate_batch_size(batch_size: Any, n: int, num_devices: int) -> int:
    """Check ``1 <= batch_size <= n`` and that the devices can split it evenly."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ConfigurationError(f"batch_size must be an int; got {batch_size!r}.")
    batch_size = int(batch_size)
    if not 1 <= batch_size <= n:
        raise ConfigurationError(f"batch_size must be between 1 and the number of rows ({n}); got {batch_size}.")
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        upper = lower + num_devices
        nearest = [size for size in (lower, upper) if 1 <= size <= n]
        raise ConfigurationError(
            f"batch_size={batch_size} does not split evenly over {num_devices} devices; the "
            f"nearest valid sizes are {nearest}."
        )
    return batch_size


def device_data_budget(device: jax.Device, num_local_devices: int) -> int:
    """Bytes of training data each device may hold when the data are placed on the devices.

    On an accelerator: 40% of its memory (the rest is for the model, the optimizer and XLA's
    workspace). On the CPU backend every "device" shares host RAM and holds its own replica:
    25% of physical memory split across the local devices.
    """
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(0.4 * stats["bytes_limit"])
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.25 * physical) // num_local_devices


def resolve_placement(placement: Placement, data_bytes: int, budget: int) -> Literal["device", "host"]:
    """Pick where the training arrays live: on the devices if they fit the budget."""
    if placement not in ("auto", "device", "host"):
        raise ConfigurationError(f"data_placement must be 'auto', 'device' or 'host'; got {placement!r}.")
    if placement == "auto":
        return "device" if data_bytes <= budget else "host"
    return placement


@dataclass(frozen=True)
class FitPlan:
    """How a fit walks through the data: batches per epoch, chunks of steps, when to stop.

    Chunks never cross an epoch boundary. Within an epoch every chunk has ``steps_per_chunk``
    steps except possibly the last (the remainder), so a fit compiles at most three chunk
    lengths (full, epoch remainder, and a ``max_steps`` cut), never one per epoch.
    """

    num_rows: int
    batch_size: int
    steps_per_epoch: int
    steps_per_chunk: int
    total_steps: int

    @classmethod
    def create(
        cls,
        num_rows: int,
        batch_size: int,
        *,
        drop_last: bool,
        max_epochs: int | None,
        max_steps: int | None,
        steps_per_chunk: int | None,
    ) -> FitPlan:
        steps_per_epoch = num_rows // batch_size if drop_last else math.ceil(num_rows / batch_size)
        limits = []
        if max_epochs is not None:
            limits.append(max_epochs * steps_per_epoch)
        if max_steps is not None:
            limits.append(max_steps)
        return cls(
            num_rows=num_rows,
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            steps_per_chunk=steps_per_chunk or default_steps_per_chunk(steps_per_epoch),
            total_steps=min(limits),
        )

    @property
    def chunks_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.steps_per_chunk)

    @property
    def num_chunks(self) -> int:
        full_epochs, rest = divmod(self.total_steps, self.steps_per_epoch)
        return full_epochs * self.chunks_per_epoch + math.ceil(rest / self.steps_per_chunk)

    def chunk_lengths(self) -> set[int]:
        """Every chunk length this plan uses (what has to be compiled)."""
        first_epoch = range(min(self.chunks_per_epoch, self.num_chunks))
        return {self.chunk(i)[2] for i in first_epoch} | {self.chunk(self.num_chunks - 1)[2]}

    def chunk(self, index: int) -> tuple[int, int, int]:
        """``(epoch, first global step, number of steps)`` of chunk ``index``."""
        epoch, position = divmod(index, self.chunks_per_epoch)
        first_in_epoch = position * self.steps_per_chunk
        first_step = epoch * self.steps_per_epoch + first_in_epoch
        length = min(
            self.steps_per_chunk,
            self.steps_per_epoch - first_in_epoch,
            self.total_steps - first_step,
        )
        return epoch, first_step, length


def default_steps_per_chunk(steps_per_epoch: int, target: int = 50) -> int:
    """Steps per compiled call: ``target`` or, when one exists, a divisor of the epoch length
    close below it (so every chunk of an epoch has the same length)."""
    if steps_per_epoch <= target:
        return steps_per_epoch
    for size in range(target, target // 2 - 1, -1):
        if steps_per_epoch % size == 0:
            return size
    return target


class ChunkSource:
    """A Grain random-access source: record ``c`` holds the row indices of chunk ``c``.

    The indices are this process's columns of each global batch, shape
    ``(steps, batch_size // process_count)``, so every process reads its share of every step.
    """

    def __init__(
        self,
        plan: FitPlan,
        *,
        seed: Sequence[int],
        shuffle: bool,
        process_index: int,
        process_count: int,
    ) -> None:
        self._plan = plan
        self._seed = seed
        self._shuffle = shuffle
        local = plan.batch_size // process_count
        self._columns = slice(process_index * local, (process_index + 1) * local)
        self._index_dtype = np.int32 if plan.num_rows < 2**31 else np.int64

    def __len__(self) -> int:
        return self._plan.num_chunks

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, first_step, length = self._plan.chunk(index)
        first_in_epoch = first_step - epoch * self._plan.steps_per_epoch
        order = self.epoch_order(epoch)
        size = self._plan.batch_size
        rows = order[first_in_epoch * size : (first_in_epoch + length) * size]
        batches = np.sort(rows.reshape(length, size), axis=1)
        return {"indices": np.ascontiguousarray(batches[:, self._columns])}

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one source per fit; two epochs in flight at most
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's row order, padded to whole batches (see the module docstring)."""
        n = self._plan.num_rows
        if self._shuffle:
            order = np.random.default_rng([*self._seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        order = order.astype(self._index_dtype)
        padding = self._plan.steps_per_epoch * self._plan.batch_size - n
        if padding > 0:
            order = np.concatenate([order, order[:padding]])
        return order


def make_chunk_loader(
    source: ChunkSource,
    host_arrays: Mapping[str, np.ndarray] | None,
    *,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The Grain pipeline over ``source``: index chunks, or (with ``host_arrays``) the gathered
    rows of each chunk, read ahead on Grain's threads."""
    dataset = grain.MapDataset.source(source)
    if host_arrays is not None:
        dataset = dataset.map(functools.partial(_gather_rows, host_arrays))
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=2 if host_arrays is not None else 1, prefetch_buffer_size=prefetch)
    )


def _gather_rows(arrays: Mapping[str, np.ndarray], record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    indices = record["indices"]
    # Cast on the chunk, not the whole array: float64 inputs would otherwise need a full copy.
    return {
        key: np.take(array, indices, axis=0).astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)
        for key, array in arrays.items()
    }
