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
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import grain
import jax
import numpy as np

from aimz_trainer.errors import ConfigurationError, DataError

__all__ = [
    "Chunk",
    "ChunkSource",
    "FitPlan",
    "Placement",
    "ValidationSource",
    "device_data_budget",
    "digest_rows",
    "epoch_length",
    "leading_batch",
    "make_chunk_loader",
    "nonfinite",
    "require_finite_rows",
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
        try:
            array = value if isinstance(value, np.ndarray | jax.Array) else np.asarray(value)
        except (TypeError, ValueError) as error:  # ragged nested lists: rows of different lengths
            raise DataError(f"{name}[{key!r}] is not an array with one row per observation ({error}).") from error
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


def nonfinite(array: Any) -> tuple[tuple[int, ...], int] | None:
    """``(index of the first NaN or infinity, how many there are)`` in a float array; ``None``
    when there are none.

    Example:
        >>> nonfinite(np.array([1.0, np.nan, np.inf])), nonfinite(np.arange(3))
        (((1,), 2), None)
    """
    value = np.asarray(array)
    # A sum is NaN or infinite when any term is (or, rarely, when it overflows): one pass
    # without a mask the size of the data.
    if value.dtype.kind not in "fc" or np.isfinite(np.sum(value)):
        return None
    bad = ~np.isfinite(value)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), value.shape)), int(bad.sum())


def require_finite_rows(name: str, arrays: Mapping[str, Any], consequence: str) -> None:
    """Raise :class:`DataError` at the first NaN or infinity of ``arrays`` (rows of ``name``),
    naming the array, the value, its row and ``consequence``."""
    for key, array in arrays.items():
        if (found := nonfinite(array)) is not None:
            index, count = found
            raise DataError(
                f"{name}[{key!r}] holds {np.asarray(array)[index]} at row {index[0]} ({count} non-finite value(s) "
                f"in all): {consequence}"
            )


def digest_rows(digest: hashlib._Hash, arrays: Mapping[str, Any]) -> None:
    """Feed ``digest`` each array's name, shape and dtype and every n/1024-th row, in name
    order: cheap at any size (hashing 100 million rows would take seconds), and enough to tell
    apart two datasets given by mistake, not proof that two are equal.

    Example:
        >>> a, b = hashlib.sha256(), hashlib.sha256()
        >>> digest_rows(a, {"X": np.zeros((4, 2))}); digest_rows(b, {"X": np.ones((4, 2))})
        >>> a.hexdigest() == b.hexdigest()
        False
    """
    for name, value in sorted(arrays.items()):
        array = np.asarray(value)
        sample = array[:: max(1, len(array) // 1024)] if array.ndim else array
        digest.update(f"{name}{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())


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
    if not isinstance(placement, str) or placement not in ("auto", "device", "host"):
        raise ConfigurationError(f"data_placement must be 'auto', 'device' or 'host'; got {placement!r}.")
    if placement == "auto":
        return "device" if data_bytes <= budget else "host"
    return placement


class Chunk(NamedTuple):
    """A run of consecutive steps inside one epoch, executed by one compiled call."""

    epoch: int
    first_step: int
    num_steps: int

    @property
    def steps(self) -> range:
        return range(self.first_step, self.first_step + self.num_steps)


@dataclass(frozen=True)
class FitPlan:
    """How a fit walks through the data: batches per epoch, chunks of steps, when to stop.

    A chunk ends at every epoch end and at every multiple of each interval in ``boundaries``
    (logging, validation, checkpoints: the hooks see the fit exactly there), and otherwise
    after ``steps_per_chunk`` steps. Every chunk is run by the same compiled function, padded
    to ``steps_per_chunk`` steps with inactive ones, so chunk lengths never cause a compile.
    """

    num_rows: int
    batch_size: int
    steps_per_epoch: int
    steps_per_chunk: int
    total_steps: int
    chunks: tuple[Chunk, ...]

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
        boundaries: Sequence[int] = (),
    ) -> FitPlan:
        steps_per_epoch = epoch_length(num_rows, batch_size, drop_last=drop_last)
        limits = []
        if max_epochs is not None:
            limits.append(max_epochs * steps_per_epoch)
        if max_steps is not None:
            limits.append(max_steps)
        total_steps = min(limits)
        steps_per_chunk = steps_per_chunk or default_steps_per_chunk(steps_per_epoch, boundaries)
        return cls(
            num_rows=num_rows,
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            steps_per_chunk=steps_per_chunk,
            total_steps=total_steps,
            chunks=tuple(_cut_chunks(steps_per_epoch, total_steps, steps_per_chunk, boundaries)),
        )

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def is_epoch_end(self, chunk: Chunk) -> bool:
        end = chunk.first_step + chunk.num_steps
        return end % self.steps_per_epoch == 0 or end == self.total_steps


def epoch_length(num_rows: int, batch_size: int, *, drop_last: bool) -> int:
    """Steps per epoch: a last partial batch is completed, or dropped with ``drop_last``."""
    return num_rows // batch_size if drop_last else math.ceil(num_rows / batch_size)


def _cut_chunks(steps_per_epoch: int, total_steps: int, steps_per_chunk: int, boundaries: Sequence[int]) -> list[Chunk]:
    chunks = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        start = epoch * steps_per_epoch
        end = min(start + steps_per_epoch, total_steps)
        cuts = {end}
        for interval in boundaries:
            cuts.update(range((start // interval + 1) * interval, end, interval))
        for cut in sorted(cuts):
            while start < cut:
                length = min(steps_per_chunk, cut - start)
                chunks.append(Chunk(epoch, start, length))
                start += length
    return chunks


def default_steps_per_chunk(steps_per_epoch: int, boundaries: Sequence[int] = (), target: int = 50) -> int:
    """Steps per compiled call: about ``target``, preferably a divisor of the epoch length and of
    every boundary interval so that chunks need no padding steps. Padding is cheap (inactive
    steps skip the update) but not free, and too short a chunk syncs with the host too often."""
    span = math.gcd(steps_per_epoch, *boundaries)
    if span <= target:
        return span if span >= target // 5 else min(target, steps_per_epoch)
    for size in range(target, target // 2 - 1, -1):
        if span % size == 0:
            return size
    return target


class ChunkSource:
    """A Grain random-access source: record ``c`` holds the row indices of chunk ``c``.

    ``record["indices"]`` has shape ``(steps_per_chunk, batch_size // process_count)``: this
    process's columns of each global batch, so every process reads its share of every step.
    Rows past ``record["num_steps"]`` are padding (row 0) for the inactive steps.
    ``record["rows"]`` is empty: the rows themselves are gathered later, on the host
    (:func:`make_chunk_loader`) or on the devices.
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self._plan.chunks[index]
        first_in_epoch = chunk.first_step - chunk.epoch * self._plan.steps_per_epoch
        size = self._plan.batch_size
        rows = self.epoch_order(chunk.epoch)[first_in_epoch * size : (first_in_epoch + chunk.num_steps) * size]
        batches = np.sort(rows.reshape(chunk.num_steps, size), axis=1)[:, self._columns]
        indices = np.zeros((self._plan.steps_per_chunk, batches.shape[1]), self._index_dtype)
        indices[: chunk.num_steps] = batches
        return {"indices": indices, "rows": {}, "num_steps": np.int32(chunk.num_steps)}

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


class ValidationSource:
    """A Grain random-access source of validation batches, in row order, one per record.

    The last batch wraps around to the first rows to keep the batch shape; ``weights`` are 0
    for those repeated rows so per-observation metrics count every row exactly once.
    """

    def __init__(self, num_rows: int, batch_size: int, *, process_index: int, process_count: int) -> None:
        self._num_rows = num_rows
        self._batch_size = batch_size
        local = batch_size // process_count
        self._columns = slice(process_index * local, (process_index + 1) * local)

    def __len__(self) -> int:
        return math.ceil(self._num_rows / self._batch_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        positions = np.arange(index * self._batch_size, (index + 1) * self._batch_size)[self._columns]
        indices = (positions % self._num_rows).astype(np.int32 if self._num_rows < 2**31 else np.int64)
        weights = (positions < self._num_rows).astype(np.float32)
        return {"indices": indices[None], "rows": {}, "weights": weights[None], "num_steps": np.int32(1)}


def make_chunk_loader(
    source: ChunkSource | ValidationSource,
    host_arrays: Mapping[str, np.ndarray] | None,
    *,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The Grain pipeline over ``source``: index records, or (with ``host_arrays``) records
    whose ``rows`` are the gathered rows themselves, beside their indices, read ahead on
    Grain's threads."""
    dataset = grain.MapDataset.source(source)
    if host_arrays is not None:
        dataset = dataset.map(functools.partial(_gather_rows, host_arrays))
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=2 if host_arrays is not None else 1, prefetch_buffer_size=prefetch)
    )


def leading_batch(
    num_rows: int,
    batch_size: int,
    host_arrays: Mapping[str, np.ndarray] | None,
    *,
    process_index: int,
    process_count: int,
) -> dict[str, Any]:
    """A record of one step over the data's first ``batch_size`` rows, in row order (wrapping
    around when there are fewer): ``{"indices", "rows"}``, this process's columns, the rows
    gathered when ``host_arrays`` are given. A batch that depends neither on the shuffle nor on
    where a fit was resumed."""
    source = ValidationSource(num_rows, batch_size, process_index=process_index, process_count=process_count)
    record = source[0]
    if host_arrays is not None:
        record = _gather_rows(host_arrays, record)
    return {"indices": record["indices"], "rows": record["rows"]}


def _gather_rows(arrays: Mapping[str, np.ndarray], record: dict[str, Any]) -> dict[str, Any]:
    indices = record["indices"][: record["num_steps"]]
    padding = record["indices"].shape[0] - indices.shape[0]
    rows = {}
    for key, array in arrays.items():
        # Cast on the chunk, not the whole array: float64 inputs would otherwise need a full copy.
        gathered = np.take(array, indices, axis=0).astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)
        if padding:
            gathered = np.concatenate([gathered, np.zeros((padding, *gathered.shape[1:]), gathered.dtype)])
        rows[key] = gathered
    return {**record, "rows": rows}
