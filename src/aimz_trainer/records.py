"""Record-oriented data as columns: a random-access source of records read by rows.

Data stored as records (ArrayRecord files, a Grain ``MapDataset`` that decodes them, a list of
dicts) rather than as arrays: record ``i`` is row ``i``, a mapping from the model's keyword
names to that row's values. :func:`record_columns` turns such a source into the mapping of
lazy columns that ``Trainer.fit``, the ``Predictor`` and ``ImpactModel`` take
(:func:`~aimz_trainer.data.is_lazy_source`); passing the source itself as the data does the
same. Only record 0 is read to learn the columns; every later read fetches the records of the
rows asked for (in one batched read where the source has one: Grain's ``_getitems``,
ArrayRecord's ``__getitems__``) and serves every column of them, so the fit's chunks and the
Predictor's batches read each record once, whatever the number of columns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aimz_trainer.errors import DataError

__all__ = ["RecordColumn", "is_record_source", "record_columns"]

_CACHED_READS = 4  # reads kept for the other columns: Grain maps two chunks at once


def is_record_source(value: Any) -> bool:
    """Whether ``value`` is a random-access source of records (``len`` and integer indexing)
    rather than a mapping of arrays or an array. Whether its records are mappings is checked
    when :func:`record_columns` reads record 0."""
    if isinstance(value, Mapping | str | bytes | np.ndarray) or hasattr(value, "shape"):
        return False
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def record_columns(source: Any, *, name: str = "data") -> dict[str, RecordColumn]:
    """The columns of a random-access source of records, each a lazy source of rows.

    Args:
        source: ``len(source)`` records, ``source[i]`` a mapping from keyword names to row
            ``i``'s values (numbers or arrays, the same shape and dtype in every record): a
            Grain ``MapDataset`` (e.g. ``grain.MapDataset.source(ArrayRecordDataSource(paths))
            .map(decode)``), a Grain data source or a list of dicts.
        name: the argument's name, for errors.

    Example:
        >>> records = [{"x": np.full(2, i, np.float32), "y": np.float32(i)} for i in range(5)]
        >>> columns = record_columns(records)
        >>> columns["x"].shape, columns["y"][1:3].tolist()
        ((5, 2), [1.0, 2.0])
    """
    num_rows = len(source)
    if num_rows == 0:
        raise DataError(f"{name} is a source of records with no records.")
    first = source[0]
    if not isinstance(first, Mapping) or not first:
        raise DataError(
            f"{name} must be a mapping from the model's keyword names to arrays, e.g. {{'X': X, 'y': y}}, or a "
            f"random-access source of records each mapping those names to one row's values; record 0 of the "
            f"{type(source).__name__} given is {type(first).__name__}."
        )
    reader = _RecordReader(source, {key: np.asarray(value) for key, value in first.items()}, name)
    return {key: RecordColumn(reader, key) for key in first}


class RecordColumn:
    """One column of a record source: ``shape`` (records, *row shape), ``dtype``, and rows by
    slice or index array (``column[2:5]``, ``column[np.array([0, 3])]``), read through the
    records they are part of, shared with the source's other columns."""

    def __init__(self, reader: _RecordReader, key: str) -> None:
        self._reader = reader
        self.key = key
        row = reader.prototype[key]
        self.shape = (len(reader.source), *row.shape)
        self.dtype = row.dtype

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        return self.take(np.asarray(rows))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (any shape, order and repeats), shaped ``(*indices.shape, *row shape)``."""
        return self._reader.take(indices)[self.key]


class _RecordReader:
    """Reads records by rows and splits them into columns; keeps the last few reads, so the
    other columns of the same rows are served without reading again (thread-safe: Grain reads
    on several threads)."""

    def __init__(self, source: Any, prototype: Mapping[str, np.ndarray], name: str) -> None:
        self.source = source
        self.prototype = prototype
        self._name = name
        self._lock = threading.Lock()
        self._reads: OrderedDict[tuple[Any, ...], dict[str, np.ndarray]] = OrderedDict()

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        key = (indices.shape, indices.dtype.str, indices.tobytes())
        with self._lock:
            if key in self._reads:
                return self._reads[key]
        unique, inverse = np.unique(indices.ravel(), return_inverse=True)
        records = self._fetch(unique.tolist())
        columns = {}
        for column, row in self.prototype.items():
            try:
                values = np.stack([np.asarray(record[column]) for record in records]).astype(row.dtype, copy=False)
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(
                    f"{self._name}: the records of rows {unique[0]}..{unique[-1]} do not all hold {column!r} as an "
                    f"array of shape {row.shape} like record 0 ({error!r})."
                ) from error
            if values.shape[1:] != row.shape:
                raise DataError(
                    f"{self._name}: the records of rows {unique[0]}..{unique[-1]} hold {column!r} of shape "
                    f"{values.shape[1:]}; record 0 holds shape {row.shape}."
                )
            columns[column] = values[inverse.reshape(-1)].reshape(*indices.shape, *row.shape)
        with self._lock:
            self._reads[key] = columns
            while len(self._reads) > _CACHED_READS:
                self._reads.popitem(last=False)
        return columns

    def _fetch(self, rows: Sequence[int]) -> Sequence[Any]:
        for batched in ("_getitems", "__getitems__"):  # Grain's and ArrayRecord's batched reads
            if callable(read := getattr(self.source, batched, None)):
                return read(rows)
        return [self.source[row] for row in rows]
