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

On disk an exact permutation makes every batch a scatter of single-row reads. Passing
``shuffle=BlockShuffle(block_rows, window_blocks)`` instead orders an epoch by a seeded
permutation of fixed blocks of ``block_rows`` consecutive rows, then shuffles the rows inside
each window of ``window_blocks`` consecutive blocks of that order: a chunk aligned with the
windows reads a few whole blocks. Like the exact permutation it is a pure function of
``(seed, epoch)`` and the two sizes (a checkpoint records them), so a resumed fit reads the
same batches; it is opt-in, and ``shuffle=True`` keeps the exact per-row permutation.

The last partial batch (``n % batch_size`` rows) is, by default, completed with the first rows
of the same epoch's permutation, so every row is seen at least once per epoch and every step
has the same shape; with ``drop_last=True`` it is dropped instead (a different remainder each
epoch, since the order changes). Either way no step ever has another batch shape.

Data larger than memory: any array of ``train_data`` may be a *lazy source* instead of an
in-memory array (:func:`is_lazy_source`): a ``zarr.Array`` (v2 or v3, local or remote), an
``np.memmap`` (``np.load(path, mmap_mode="r")``), or any object with ``shape``, ``dtype`` and
slicing by rows (``source[start:stop]``, an array back) that is not itself array-convertible.
Nothing reads a lazy source whole: its checks and digests read its metadata and a fixed
sample of rows (:func:`sample_indices`), and the host placement reads the rows of each chunk
on Grain's prefetch threads (:func:`~aimz_trainer.row_reads.read_rows`: the distinct rows in
sorted order, runs of consecutive rows read as one slice, a Zarr store's decoded chunks kept for
the next chunk of steps), each process the rows of its own share of every batch.
``"auto"`` placement keeps lazy sources on the host. The rows read are the rows an in-memory
fit gathers, so the batches and losses are those of the same fit from NumPy arrays. Rows the
sample does not cover are checked for NaN and infinity as their chunk is read. Record-oriented
data (a Grain random-access source of records, such as ArrayRecord files decoded by a
``MapDataset``) is taken as lazy columns (:mod:`aimz_trainer.records`), each record read once.

Every device of the mesh holds as many columns of a batch. When ``batch_size`` does not split
evenly over the devices, each batch gets padding columns up to the next multiple of the device
count (:attr:`~aimz_trainer.plan.FitPlan.padded_batch_size`): after the sorted rows, the
batch's first row again. They hold valid rows, so the model computes finite values on them,
and the compiled step masks them out of the ELBO and keeps the minibatch scale of the real
rows (:func:`~aimz_trainer.plates.padding_masked`): the losses, gradients and parameters are a
one-device fit's, to float32 rounding. Validation batches are padded alike, their padding
columns with weight 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import numpy as np

from aimz_trainer.distributed import require_agreement
from aimz_trainer.errors import ConfigurationError, DataError
from aimz_trainer.plan import BatchLimit, FitPlan, limited
from aimz_trainer.records import is_record_source, record_columns
from aimz_trainer.row_reads import ChunkCache, cache_storage_chunks, read_rows
from aimz_trainer.sharding import place_replicated

if TYPE_CHECKING:
    import grain

__all__ = [
    "NONFINITE_ROWS",
    "BlockShuffle",
    "ChunkSource",
    "PlacedData",
    "Placement",
    "ValidationSource",
    "check_processes_agree",
    "data_bytes",
    "device_data_budget",
    "digest_rows",
    "first_record",
    "is_lazy_source",
    "leading_batch",
    "make_chunk_loader",
    "nonfinite",
    "place_data",
    "read_ahead",
    "read_rows",
    "read_sample",
    "require_finite_read",
    "require_finite_rows",
    "resolve_placement",
    "sample_indices",
    "samples_read_once",
    "validate_batch_size",
    "validate_data",
    "validate_val_data",
]

Placement = Literal["auto", "device", "host"]
ArrayLike = np.ndarray | jax.Array

_NUMERIC_KINDS = "biuf"
_SAMPLE_RUNS, _SAMPLE_RUN_ROWS = 16, 64  # a digest's or a check's sample: 1,024 rows in 16 runs
_ORDER_PIECE = 1 << 20  # rows of an epoch order completed at a time

_log = logging.getLogger(__name__)


def is_lazy_source(value: Any) -> bool:
    """Whether ``value`` is read by rows, never whole: an ``np.memmap``, a ``zarr.Array``, or
    an object with ``shape``, ``dtype`` and ``__getitem__`` and no ``__array__`` (a source
    that cannot be converted whole by mistake). NumPy and JAX arrays are in memory; other
    array-likes (lists, pandas, torch) are converted with ``np.asarray`` as before.

    Example:
        >>> is_lazy_source(np.zeros(3)), is_lazy_source([1, 2])
        (False, False)
        >>> class Rows:  # the least a source needs
        ...     shape, dtype = (10, 2), np.dtype(np.float32)
        ...     def __getitem__(self, rows): return np.zeros((10, 2), np.float32)[rows]
        >>> is_lazy_source(Rows())
        True
    """
    if isinstance(value, np.memmap):
        return True
    if isinstance(value, np.ndarray | jax.Array):
        return False
    if type(value).__module__.split(".")[0] == "zarr":
        return hasattr(value, "shape") and hasattr(value, "dtype")
    return all(hasattr(value, name) for name in ("shape", "dtype", "__getitem__")) and not hasattr(value, "__array__")


def sample_indices(num_rows: int) -> np.ndarray:
    """The rows a digest or a check of data reads: all rows up to 2,047, else 16 runs of 64
    consecutive rows spread evenly from the first row to the last. The same rows in memory and
    on disk, so a lazy source and the same data in memory digest alike. Runs, not single rows
    spread out: a chunked store decodes a whole storage chunk for any row of it, so 1,024 rows
    one by one would decode 1,024 chunks (most of a 20-million-row store); 16 runs decode 32 at
    most.

    Example:
        >>> sample_indices(5).tolist(), len(sample_indices(10_000_000))
        ([0, 1, 2, 3, 4], 1024)
        >>> rows = sample_indices(10_000_000); rows[62:66].tolist(), rows[-1].item()
        ([62, 63, 666662, 666663], 9999999)
    """
    if num_rows < 2 * _SAMPLE_RUNS * _SAMPLE_RUN_ROWS:
        return np.arange(num_rows)
    starts = np.arange(_SAMPLE_RUNS, dtype=np.int64) * (num_rows - _SAMPLE_RUN_ROWS) // (_SAMPLE_RUNS - 1)
    return (starts[:, None] + np.arange(_SAMPLE_RUN_ROWS)).ravel()


def validate_data(data: Any, *, name: str = "train_data") -> tuple[dict[str, ArrayLike], int]:
    """Check that ``data`` maps keyword names to numeric arrays of one common length. A
    random-access source of records (:mod:`aimz_trainer.records`) is taken as its columns.

    Returns:
        The arrays (NumPy arrays stay NumPy, JAX arrays stay JAX, lazy sources stay as given,
        unread: :func:`is_lazy_source`; anything else array-like is converted with
        ``np.asarray``) and their common length ``n``.
    """
    if is_record_source(data):
        data = record_columns(data, name=name)
    if not isinstance(data, Mapping):
        raise DataError(
            f"{name} must be a mapping from the model's keyword names to arrays, e.g. "
            f"{{'X': X, 'y': y}}, or a random-access source of such records; got {type(data).__name__}."
        )
    if not data:
        raise DataError(f"{name} is empty: pass at least one array, e.g. {{'X': X}}.")
    arrays: dict[str, ArrayLike] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise DataError(f"{name} keys must be keyword names (identifiers); got {key!r}.")
        try:
            if isinstance(value, np.ndarray | jax.Array):
                array = value
            elif is_lazy_source(value):
                array = _LazyView(value)
            else:
                array = np.asarray(value)
        except (TypeError, ValueError) as error:  # ragged nested lists: rows of different lengths
            raise DataError(f"{name}[{key!r}] is not an array with one row per observation ({error}).") from error
        if array.dtype.kind not in _NUMERIC_KINDS:
            # bfloat16 and the float8 types are floats to JAX but of NumPy kind "V": the NaN checks
            # here and the Predictor's input checks know NumPy's own floats only, so these are
            # refused, with the cast to use.
            hint = (
                " (bfloat16 and other ml_dtypes floats are not taken: pass .astype(np.float32) and cast inside "
                "the model where it should compute in lower precision)"
                if jax.dtypes.issubdtype(array.dtype, jax.numpy.floating)
                else ""
            )
            raise DataError(
                f"{name}[{key!r}] has dtype {array.dtype}; expected a boolean, integer or floating-point array{hint}."
            )
        if array.ndim == 0:
            raise DataError(f"{name}[{key!r}] is a scalar; expected an array with one row per observation.")
        arrays[key] = array.source if isinstance(array, _LazyView) else array
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


_shared_samples: contextvars.ContextVar[dict[int, tuple[Any, np.ndarray]] | None] = contextvars.ContextVar(
    "_shared_samples", default=None
)


@contextlib.contextmanager
def samples_read_once() -> Iterator[None]:
    """Within it (the checks of one fit or prediction), each lazy source's sample
    (:func:`sample_indices`) is read once, however many checks and digests want it: from a
    chunked store each run of sampled rows costs up to two storage chunks. Nested uses share the
    outermost one's; the data are read anew by the next call.

    Example:
        >>> class Counted:
        ...     shape, dtype, reads = (8,), np.dtype(np.float32), 0
        ...     def __getitem__(self, rows): Counted.reads += 1; return np.zeros(8, np.float32)[rows]
        >>> source = Counted()
        >>> with samples_read_once():
        ...     require_finite_rows("data", {"x": source}, ""); digest_rows(hashlib.sha256(), {"x": source})
        >>> Counted.reads  # one slice of the 8 sampled rows, once
        1
    """
    if _shared_samples.get() is not None:
        yield
        return
    token = _shared_samples.set({})
    try:
        yield
    finally:
        _shared_samples.reset(token)


def read_sample(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, values)``: the rows of a lazy source that checks and digests read
    (:func:`sample_indices`) and their values, read once per :func:`samples_read_once`."""
    rows = sample_indices(int(source.shape[0]))
    shared = _shared_samples.get()
    if shared is None:
        return rows, read_rows(source, rows)
    kept = shared.get(id(source))
    if kept is None or kept[0] is not source:  # the source itself is kept: its id is not reused meanwhile
        kept = shared[id(source)] = (source, read_rows(source, rows))
    return rows, kept[1]


def require_finite_rows(name: str, arrays: Mapping[str, Any], consequence: str) -> None:
    """Raise :class:`DataError` at the first NaN or infinity of ``arrays`` (rows of ``name``),
    naming the array, the value, its row and ``consequence``. Of a lazy source, only the
    sampled rows (:func:`sample_indices`) are read here; the others are checked as a fit
    reads them."""
    for key, array in arrays.items():
        if is_lazy_source(array):
            rows, values = read_sample(array)
            if (found := nonfinite(values)) is not None:
                index, _ = found
                raise DataError(
                    f"{name}[{key!r}] holds {values[index]} at row {rows[index[0]]} (a row of the "
                    f"sample checked before the fit; {name} is read lazily): {consequence}"
                )
            continue
        if (found := nonfinite(array)) is not None:
            index, count = found
            raise DataError(
                f"{name}[{key!r}] holds {np.asarray(array)[index]} at row {index[0]} ({count} non-finite value(s) "
                f"in all): {consequence}"
            )


def require_finite_read(name: str, rows: np.ndarray, row_numbers: np.ndarray, consequence: str) -> None:
    """Raise :class:`DataError` at the first NaN or infinity of ``rows``, just read from the lazy
    source ``name`` (rows the sample checked up front may not have covered), naming the value,
    its row (``row_numbers``: the row number of each of ``rows``' leading entries) and
    ``consequence``."""
    if (found := nonfinite(rows)) is not None:
        index, count = found
        raise DataError(
            f"the lazy source {name!r} holds {rows[index]} at row {row_numbers[index[: row_numbers.ndim]]} ({count} "
            f"non-finite value(s) in the rows read): {consequence}"
        )


def read_ahead(read: Callable[[Any], Any], items: Sequence[Any], *, prefetch: int = 2) -> Iterator[Any]:
    """``read(item)`` for each of ``items``, in order, computed on a Grain thread up to
    ``prefetch`` items ahead of the consumer: reading the next batch overlaps computing this one.
    An error of ``read`` is raised where its item is consumed.

    Example:
        >>> list(read_ahead(lambda start: np.arange(start, start + 2), [0, 10]))
        [array([0, 1]), array([10, 11])]
    """
    import grain

    dataset = grain.MapDataset.source(items).map(read)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


NONFINITE_ROWS = (
    "the ELBO of every batch holding that row would be NaN. Fill or drop those rows; for a missing "
    "observation, fill it and mask the site (numpyro's obs_mask)."
)


def validate_val_data(val_data: Any, train_arrays: Mapping[str, Any]) -> dict[str, ArrayLike]:
    """``val_data`` checked like ``train_data``, with the same keys and row shapes."""
    arrays, _ = validate_data(val_data, name="val_data")
    if set(arrays) != set(train_arrays):
        raise DataError(
            f"val_data must have the same keys as train_data: got {sorted(arrays)}, expected {sorted(train_arrays)}."
        )
    for key, array in arrays.items():
        if array.shape[1:] != train_arrays[key].shape[1:]:
            raise DataError(
                f"val_data[{key!r}] rows have shape {array.shape[1:]} but train_data[{key!r}] rows have "
                f"shape {train_arrays[key].shape[1:]}."
            )
    return arrays


def check_processes_agree(arrays: Mapping[str, Any], num_rows: int, batch_size: int) -> None:
    """Every process of a multi-process run must fit the same data with the same batch size
    (each feeds its share of every global batch): compare them before anything is compiled."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256()
    digest_rows(digest, arrays)
    require_agreement(
        {"rows": num_rows, "batch_size": batch_size, "data": digest.hexdigest()[:12]},
        "training data or batch sizes",
        "Give every process the same arrays and batch_size (each feeds its share of every batch).",
    )


def digest_rows(digest: hashlib._Hash, arrays: Mapping[str, Any]) -> None:
    """Feed ``digest`` each array's name, shape and dtype and its sampled rows
    (:func:`sample_indices`), in name order: cheap at any size (hashing 100 million rows would
    take seconds), and enough to tell apart two datasets given by mistake, not proof that two
    are equal.

    Example:
        >>> a, b = hashlib.sha256(), hashlib.sha256()
        >>> digest_rows(a, {"X": np.zeros((4, 2))}); digest_rows(b, {"X": np.ones((4, 2))})
        >>> a.hexdigest() == b.hexdigest()
        False
    """
    for name, value in sorted(arrays.items()):
        if is_lazy_source(value):
            array, (_, sample) = value, read_sample(value)
        else:
            array = np.asarray(value)
            sample = np.take(array, sample_indices(len(array)), axis=0) if array.ndim else array
        digest.update(f"{name}{tuple(array.shape)}{np.dtype(array.dtype)}".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())


def validate_batch_size(batch_size: Any, n: int) -> int:
    """Check ``1 <= batch_size <= n``. Any such size runs on any number of devices (a batch
    that does not split evenly over them is padded: see the module docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ConfigurationError(f"batch_size must be an int; got {batch_size!r}.")
    batch_size = int(batch_size)
    if not 1 <= batch_size <= n:
        raise ConfigurationError(f"batch_size must be between 1 and the number of rows ({n}); got {batch_size}.")
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


def resolve_placement(
    placement: Placement, data_bytes: int, budget: int, *, lazy: bool = False
) -> Literal["device", "host"]:
    """Pick where the training arrays live: ``"auto"`` puts them on the devices if they fit
    the budget and none is a lazy source (one is read by rows, never whole); the choice and
    its reason go to the ``aimz_trainer.data`` logger (level INFO).

    Example:
        >>> resolve_placement("auto", 10, 100), resolve_placement("auto", 10, 100, lazy=True)
        ('device', 'host')
    """
    if not isinstance(placement, str) or placement not in ("auto", "device", "host"):
        raise ConfigurationError(f"data_placement must be 'auto', 'device' or 'host'; got {placement!r}.")
    if placement != "auto":
        _log.info("data placement %r, as given (%s bytes; device budget %s bytes)", placement, data_bytes, budget)
        return placement
    if lazy:
        reason = "the data hold a lazy source (zarr, memmap, ...), read by rows on the host, never whole"
    elif data_bytes > budget:
        reason = f"the data ({data_bytes} bytes) exceed the device budget ({budget} bytes)"
    else:
        _log.info("data placement 'device': the data (%s bytes) fit the device budget (%s bytes)", data_bytes, budget)
        return "device"
    _log.info("data placement 'host': %s", reason)
    return "host"


def data_bytes(*datasets: Mapping[str, Any] | None) -> int:
    """Bytes the arrays of ``datasets`` take on a device (in JAX's canonical dtypes), from
    their shapes and dtypes: a lazy source is not read."""
    return sum(
        math.prod(array.shape) * jax.dtypes.canonicalize_dtype(np.dtype(array.dtype)).itemsize
        for arrays in datasets
        for array in (arrays or {}).values()
    )


class PlacedData(NamedTuple):
    """One dataset as the compiled functions consume it.

    Attributes:
        device_data: the arrays replicated on the mesh (``"device"`` placement), else empty.
        host_arrays: the arrays the host gathers rows from (``"host"`` placement: in memory,
            or lazy sources as given), else ``None``.
        num_rows: rows of the dataset.
    """

    device_data: dict[str, jax.Array]
    host_arrays: dict[str, Any] | None
    num_rows: int


def place_data(
    arrays: Mapping[str, Any],
    placement: Literal["device", "host"],
    mesh: Any,
    *,
    shuffle: bool | BlockShuffle = False,
) -> PlacedData:
    """Put ``arrays`` where ``placement`` says: replicated on ``mesh`` (a lazy source read
    whole), or on the host: NumPy arrays, and lazy sources read by rows later, chunked stores
    behind a :class:`~aimz_trainer.row_reads.ChunkCache` sized for the reads of ``shuffle``."""
    num_rows = int(next(iter(arrays.values())).shape[0])
    if placement == "device":
        whole = {key: np.asarray(array[:]) if is_lazy_source(array) else array for key, array in arrays.items()}
        return PlacedData(place_replicated(whole, mesh), None, num_rows)
    host = {key: array if is_lazy_source(array) else np.asarray(array) for key, array in arrays.items()}
    # Other orders than a BlockShuffle reuse no more than the chunk two reads in a row share.
    cached_rows = shuffle.cached_rows if isinstance(shuffle, BlockShuffle) else 0
    host = cache_storage_chunks(host, cached_rows)
    for key, array in host.items():
        if isinstance(array, ChunkCache):
            _log.info("%r: up to %s decoded storage chunks kept (%s bytes)", key, array.max_chunks, array.max_bytes)
    return PlacedData({}, host, num_rows)


def row_index_dtype(num_rows: int) -> type[np.signedinteger]:
    """The dtype of row numbers of ``num_rows`` rows: int32 while they fit, else int64."""
    return np.int32 if num_rows < 2**31 else np.int64


@dataclasses.dataclass(frozen=True)
class BlockShuffle:
    """An epoch order for data on disk: a seeded permutation of blocks of ``block_rows``
    consecutive rows, the rows then shuffled inside each window of ``window_blocks``
    consecutive blocks of that order (the module docstring). Pass it as ``fit``'s ``shuffle``.

    Batches mix rows of ``window_blocks`` blocks only: pick a window of several batches
    (``block_rows * window_blocks >= batch_size``; more for a better mix) and blocks of about
    a storage chunk (a Zarr chunk's rows) so that each block is one read. A fit from a chunked
    store keeps :attr:`cached_rows` (two and a half windows) of decoded rows in memory.

    Example:
        Blocks of 2 rows, windows of 2 blocks: the first window holds the blocks ``[0, 1]`` and
        ``[4, 5]``, the second ``[2, 3]`` and ``[6, 7]``, each window's rows shuffled.

        >>> BlockShuffle(block_rows=2, window_blocks=2).order(8, np.random.default_rng(0)).tolist()
        [1, 0, 5, 4, 3, 7, 2, 6]
    """

    block_rows: int = 4096
    window_blocks: int = 16

    def __post_init__(self) -> None:
        for name in ("block_rows", "window_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigurationError(f"BlockShuffle's {name} must be a positive int; got {value!r}.")

    def order(self, num_rows: int, rng: np.random.Generator) -> np.ndarray:
        """One epoch's order of ``num_rows`` rows (int32 below 2**31 rows, else int64), drawn
        from ``rng``."""
        size, dtype = int(self.block_rows), row_index_dtype(num_rows)
        starts = (rng.permutation(-(-num_rows // size)) * size).astype(dtype)
        lengths = np.minimum(starts + size, num_rows) - starts
        # Row i of the order is start of its block + its place in the block. Built in the index
        # dtype: an epoch of 20 million rows is 80 MB an array, not 160.
        order = np.repeat(starts - (np.cumsum(lengths, dtype=dtype) - lengths), lengths)
        for first in range(0, num_rows, _ORDER_PIECE):  # a piece at a time: no second array of every row
            last = min(first + _ORDER_PIECE, num_rows)
            order[first:last] += np.arange(first, last, dtype=dtype)
        # Windows start at block boundaries: all hold window_blocks * block_rows rows but the one
        # with the short last block and the last one, shuffled on their own.
        edges = np.concatenate([[0], np.cumsum(lengths)])[:: int(self.window_blocks)]
        edges = np.unique(np.concatenate([edges, [num_rows]]))
        sizes, window = np.diff(edges), size * int(self.window_blocks)
        # Each whole window shuffled in place, in order: the draws of Generator.permuted over
        # the windows as rows of one 2-D array, without that array's copies.
        for start in edges[:-1][sizes == window].tolist():
            rng.shuffle(order[start : start + window])
        for start, stop in zip(edges[:-1][sizes != window], edges[1:][sizes != window], strict=True):
            order[start:stop] = rng.permutation(order[start:stop])
        return order

    @property
    def cached_rows(self) -> int:
        """Rows of decoded storage chunks a fit from a chunked store keeps
        (:class:`~aimz_trainer.row_reads.ChunkCache`): two and a half windows. Two compiled
        chunks read at once touch up to three windows, the window between them shared; at two
        and a half, the shared window is still there when the later chunk reads it.

        Example:
            >>> BlockShuffle(block_rows=16384, window_blocks=16).cached_rows  # 265 MB at 404 bytes a row
            655360
        """
        return int(self.block_rows) * int(self.window_blocks) * 5 // 2

    def record(self) -> dict[str, int]:
        """As a checkpoint records it: ``{"block_rows", "window_blocks"}``."""
        return {"block_rows": int(self.block_rows), "window_blocks": int(self.window_blocks)}


class ChunkSource:
    """A Grain random-access source: record ``c`` holds the row indices of chunk ``c``.

    ``record["indices"]`` has shape ``(steps_per_chunk, padded_batch_size // process_count)``:
    this process's columns of each global batch, so every process reads its share of every
    step. Columns past ``batch_size`` repeat the batch's first row (padding for the devices,
    see the module docstring); rows past ``record["num_steps"]`` are padding (row 0) for the
    inactive steps.
    ``record["rows"]`` is empty: the rows themselves are gathered later, on the host
    (:func:`make_chunk_loader`) or on the devices.
    """

    def __init__(
        self,
        plan: FitPlan,
        *,
        seed: Sequence[int],
        shuffle: bool | BlockShuffle,
        process_index: int,
        process_count: int,
    ) -> None:
        self._plan = plan
        self._seed = seed
        self._shuffle = shuffle
        local = plan.padded_batch_size // process_count
        self._columns = slice(process_index * local, (process_index + 1) * local)
        self._index_dtype = row_index_dtype(plan.num_rows)

    def __len__(self) -> int:
        return self._plan.num_chunks

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self._plan.chunks[index]
        first_in_epoch = chunk.first_step - chunk.epoch * self._plan.steps_per_epoch
        size = self._plan.batch_size
        rows = self._rows(chunk.epoch, first_in_epoch * size, (first_in_epoch + chunk.num_steps) * size)
        batches = _padded_columns(np.sort(rows.reshape(chunk.num_steps, size), axis=1), self._plan.padded_batch_size)
        batches = batches[:, self._columns]
        indices = np.zeros((self._plan.steps_per_chunk, batches.shape[1]), self._index_dtype)
        indices[: chunk.num_steps] = batches
        return {"indices": indices, "rows": {}, "num_steps": np.int32(chunk.num_steps)}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The rows the epoch's batches take, in order: its order padded to whole batches (see the
        module docstring), or cut to them with ``drop_last``."""
        return self._rows(epoch, 0, self._plan.steps_per_epoch * self._plan.batch_size)

    def _rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Places ``[start, stop)`` of the epoch's padded order: past the last row, the order
        starts again (never built whole: an epoch's order is a large array at scale)."""
        order = self._order(epoch)
        if stop <= len(order):
            return order[start:stop]
        return np.concatenate([order[start:], order[: stop - len(order)]])

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one source per fit; two epochs in flight at most
    def _order(self, epoch: int) -> np.ndarray:
        n = self._plan.num_rows
        if isinstance(self._shuffle, BlockShuffle):
            return self._shuffle.order(n, np.random.default_rng([*self._seed, epoch]))
        if self._shuffle:  # the permutation of arange(n), shuffled as permutation(n) shuffles it
            return np.random.default_rng([*self._seed, epoch]).permutation(np.arange(n, dtype=self._index_dtype))
        return np.arange(n, dtype=self._index_dtype)


class ValidationSource:
    """A Grain random-access source of validation batches, in row order, one per record.

    The last batch wraps around to the first rows to keep the batch shape; ``weights`` are 0
    for those repeated rows so per-observation metrics count every row exactly once. With
    ``padded_size`` (``batch_size`` rounded up to a multiple of the device count), every batch
    has padding columns after its ``batch_size`` ones: the batch's first row again, weight 0,
    masked out of the ELBO by the compiled step. ``limit_batches`` keeps the first batches only
    (:func:`~aimz_trainer.plan.limited`).
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        process_index: int,
        process_count: int,
        padded_size: int | None = None,
        limit_batches: BatchLimit = 1.0,
    ) -> None:
        self._num_rows = num_rows
        self._batch_size = batch_size
        self._num_batches = limited(math.ceil(num_rows / batch_size), limit_batches)
        self._padded_size = batch_size if padded_size is None else padded_size
        local = self._padded_size // process_count
        self._columns = slice(process_index * local, (process_index + 1) * local)

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: int) -> dict[str, Any]:
        columns = np.arange(self._padded_size)[self._columns]
        real = columns < self._batch_size
        positions = index * self._batch_size + np.where(real, columns, 0)
        indices = (positions % self._num_rows).astype(row_index_dtype(self._num_rows))
        weights = (real & (positions < self._num_rows)).astype(np.float32)
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
    import grain  # here, not at module level: only a fit's loaders need it

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
    padded_size: int | None = None,
) -> dict[str, Any]:
    """A record of one step over the data's first ``batch_size`` rows, in row order (wrapping
    around when there are fewer), padded to ``padded_size`` columns as :class:`ValidationSource`
    pads: ``{"indices", "rows"}``, this process's columns, the rows gathered when
    ``host_arrays`` are given. A batch that depends neither on the shuffle nor on where a fit
    was resumed."""
    source = ValidationSource(
        num_rows, batch_size, process_index=process_index, process_count=process_count, padded_size=padded_size
    )
    record = first_record(source, host_arrays)
    return {"indices": record["indices"], "rows": record["rows"]}


def first_record(source: ValidationSource, host_arrays: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """The first record :func:`make_chunk_loader` gives over ``source``, made here, without
    starting a loader: what programs are traced with."""
    record = source[0]
    return _gather_rows(host_arrays, record) if host_arrays is not None else record


def _padded_columns(batches: np.ndarray, width: int) -> np.ndarray:
    """``batches`` (steps x rows) with each step's first row repeated up to ``width`` columns."""
    missing = width - batches.shape[1]
    if missing == 0:
        return batches
    return np.concatenate([batches, np.repeat(batches[:, :1], missing, axis=1)], axis=1)


def _gather_rows(arrays: Mapping[str, np.ndarray], record: dict[str, Any]) -> dict[str, Any]:
    indices = record["indices"][: record["num_steps"]]
    padding = record["indices"].shape[0] - indices.shape[0]
    rows = {}
    for key, array in arrays.items():
        if is_lazy_source(array):
            gathered = read_rows(array, indices)
            # Rows outside the sample checked before the fit are checked as they are read.
            require_finite_read(key, gathered, indices, NONFINITE_ROWS)
        else:
            gathered = np.take(array, indices, axis=0)
        # Cast on the chunk, not the whole array: float64 inputs would otherwise need a full copy.
        gathered = gathered.astype(jax.dtypes.canonicalize_dtype(np.dtype(array.dtype)), copy=False)
        if padding:
            gathered = np.concatenate([gathered, np.zeros((padding, *gathered.shape[1:]), gathered.dtype)])
        rows[key] = gathered
    return {**record, "rows": rows}


class _LazyView(NamedTuple):
    """A lazy source while :func:`validate_data` checks it: its metadata, never its rows."""

    source: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.source.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)
