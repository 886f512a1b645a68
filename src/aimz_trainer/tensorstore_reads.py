"""A Zarr array on local disk, read through TensorStore.

A fit from a Zarr store decodes one storage chunk for every few steps, next to compiled steps
that keep every core busy. Zarr-python hands each read to its event loop and its I/O threads
and copies the chunk once more into the result; TensorStore, the C++ reader that orbax also
uses, reads and decodes the same chunk outside the GIL, with less CPU (a 6.5 MB chunk, or a
64 kB one of compressed labels, in a third to a half less). :func:`opened_with_tensorstore`
opens a ``zarr.Array`` again with TensorStore, read-only, where both read the same values: a
local store (v2 or v3, any codec TensorStore knows) whose shape and dtype (byte order included)
TensorStore reports as Zarr does. Anything else (a remote or in-memory store, a codec
TensorStore lacks) keeps Zarr's own reads. Rows read are copied into NumPy's memory
(:class:`TensorStoreRows`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["opened_with_tensorstore"]

_log = logging.getLogger(__name__)

_DRIVERS = {2: "zarr", 3: "zarr3"}
# One thread each to read files and to decode: the threads that ask for rows (Grain's) are the
# concurrency. TensorStore's default, a thread per core, cost 25-75% more CPU per chunk and more
# memory, on a machine whose cores the compiled steps already use.
_ONE_THREAD_EACH = {"file_io_concurrency": {"limit": 1}, "data_copy_concurrency": {"limit": 1}}


class TensorStoreRows(NamedTuple):
    """Rows of a store opened with TensorStore: ``rows[start:stop]`` reads them, into an array
    of NumPy's own memory."""

    store: Any  # a tensorstore.TensorStore

    def __getitem__(self, rows: slice) -> np.ndarray:
        # A copy: the arrays TensorStore reads into are allocated on its threads, and the chunks a
        # fit keeps, released later from other threads, fragmented the process's memory (600 MB
        # more resident in bench_data's fit); in NumPy's memory it stays as with zarr's reads.
        return np.array(self.store[rows].read().result())


def opened_with_tensorstore(source: Any) -> TensorStoreRows | None:
    """``source`` opened again with TensorStore, read-only, when it is a ``zarr.Array`` of a
    local store that TensorStore reads with the same shape and dtype; else ``None``.

    Example:
        >>> import tempfile, zarr
        >>> array = zarr.create_array(tempfile.mkdtemp() + "/x.zarr", shape=(6,), chunks=(4,), dtype="int32")
        >>> array[:] = np.arange(6)
        >>> opened_with_tensorstore(array)[2:5].tolist()
        [2, 3, 4]
        >>> opened_with_tensorstore(np.arange(6)) is None  # not a Zarr array
        True
    """
    zarr = sys.modules.get("zarr")  # a Zarr array exists only where zarr was imported
    if zarr is None or not isinstance(source, zarr.Array) or not isinstance(source.store, zarr.storage.LocalStore):
        return None
    driver = _DRIVERS.get(source.metadata.zarr_format)
    if driver is None:
        return None
    import tensorstore

    path = Path(source.store.root) / source.path
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}, "context": _ONE_THREAD_EACH}
    try:
        view = tensorstore.open(spec, read=True).result()
    except ValueError as error:  # TensorStore's errors: a codec or metadata it does not read
        _log.debug("%s read by zarr: TensorStore cannot open it (%s)", path, error)
        return None
    if tuple(view.shape) != tuple(source.shape) or np.dtype(view.dtype.numpy_dtype) != np.dtype(source.dtype):
        _log.debug("%s read by zarr: TensorStore reads %s %s", path, view.shape, view.dtype)
        return None
    return TensorStoreRows(view)
