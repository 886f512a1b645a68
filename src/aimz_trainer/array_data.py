"""Named arrays and a loader over them: the inputs the reference library's ``ImpactModel``
methods take besides plain arrays (``fit(loader)``, ``predict(loader)``).

An :class:`ArrayLoader` yields batches as mappings of the kernel's keyword names. Given one,
:class:`~aimz_trainer.ImpactModel` takes its dataset's arrays, batch size and shuffle flag
and runs them through the Trainer or the Predictor; any other iterable of such mappings is read
batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from aimz_trainer._checks import as_key, is_int_at_least, require_bool
from aimz_trainer.errors import ConfigurationError, DataError

__all__ = ["ArrayDataset", "ArrayLoader"]


class ArrayDataset:
    """Arrays of one row per observation, by name.

    Args:
        to_jax: convert the arrays to JAX arrays (default: kept as given; other array-likes
            become NumPy arrays).
        **arrays: the named arrays; ``None`` leaves a name out.

    Raises:
        DataError: no array is given, one is a scalar, or their lengths differ.

    Example:
        >>> dataset = ArrayDataset(X=np.zeros((4, 2)), y=np.ones(4), w=None)
        >>> len(dataset), sorted(dataset.arrays), dataset[1]["y"]
        (4, ['X', 'y'], np.float64(1.0))
    """

    def __init__(self, *, to_jax: bool = False, **arrays: Any) -> None:
        require_bool("to_jax", to_jax)
        self.arrays: dict[str, Any] = {
            name: value if isinstance(value, jax.Array | np.ndarray) else np.asarray(value)
            for name, value in arrays.items()
            if value is not None
        }
        if not self.arrays:
            raise DataError("ArrayDataset needs at least one array (given as a keyword: X=..., y=...).")
        scalars = sorted(name for name, value in self.arrays.items() if np.ndim(value) == 0)
        if scalars:
            raise DataError(f"ArrayDataset arrays must have one row per observation; {scalars} are scalars.")
        lengths = {name: int(np.shape(value)[0]) for name, value in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"ArrayDataset arrays must have the same number of rows; got {lengths}.")
        self.length = next(iter(lengths.values()))
        if to_jax:
            self.arrays = {name: jax.numpy.asarray(value) for name, value in self.arrays.items()}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> dict[str, Any]:
        """Row(s) ``index`` of every array, by name."""
        return {name: value[index] for name, value in self.arrays.items()}


class ArrayLoader:
    """Batches of an :class:`ArrayDataset`, one pass per iteration.

    Args:
        dataset: the rows.
        rng_key: a typed key (``jax.random.key``), used only with ``shuffle``; each shuffled
            pass advances it, so two passes differ and a given key gives the same passes.
        batch_size: rows per batch (the last batch may be shorter).
        shuffle: a new order of the rows on every pass.

    Example:
        >>> loader = ArrayLoader(ArrayDataset(X=np.arange(5)), jax.random.key(0), batch_size=2)
        >>> [batch["X"].tolist() for batch in loader], len(loader)
        ([[0, 1], [2, 3], [4]], 3)
    """

    def __init__(self, dataset: ArrayDataset, rng_key: jax.Array, *, batch_size: int = 32, shuffle: bool = False):
        if not isinstance(dataset, ArrayDataset):
            raise ConfigurationError(f"dataset must be an ArrayDataset; got {type(dataset).__name__}.")
        if not is_int_at_least(batch_size, 1):
            raise ConfigurationError(f"batch_size must be a positive int; got {batch_size!r}.")
        require_bool("shuffle", shuffle)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng_key = as_key(rng_key)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = np.arange(len(self.dataset))
        if self.shuffle:
            self.rng_key, key = jax.random.split(self.rng_key)
            rows = np.random.default_rng(np.asarray(jax.random.key_data(key))).permutation(rows)
        for start in range(0, len(rows), self.batch_size):
            index = rows[start : start + self.batch_size]
            yield self.dataset[index if self.shuffle else slice(start, start + self.batch_size)]


def read_batches(batches: Any, what: str) -> dict[str, np.ndarray]:
    """The rows of an iterable of batch mappings, joined into one array per name (in host
    memory); a :class:`~aimz_trainer.errors.DataError` naming ``what`` for anything else."""
    parts: dict[str, list[np.ndarray]] = {}
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise DataError(f"{what}: batch {index} is a {type(batch).__name__}; expected a mapping of names to rows.")
        if parts and set(batch) != set(parts):
            raise DataError(f"{what}: batch {index} has the names {sorted(batch)}; the first had {sorted(parts)}.")
        for name, value in batch.items():
            parts.setdefault(name, []).append(np.asarray(value))
    if not parts:
        raise DataError(f"{what} yielded no batches.")
    return {name: np.concatenate(values) for name, values in parts.items()}
