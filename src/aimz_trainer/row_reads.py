"""Reading rows of a lazy source: a few large slices, and decoded storage chunks kept for the next read.

:func:`read_rows` takes any rows (any shape, order and repeats) of a lazy source with as few
slices as the rows allow, and writes each slice's wanted rows straight into the result. A chunked
store (a ``zarr.Array``: ``source.chunks``) decodes whole storage chunks whatever the slice, so
it is read once per chunk touched.

A fit reads the same storage chunks again and again: with a
:class:`~aimz_trainer.data.BlockShuffle`, consecutive compiled chunks of steps share the blocks
of the window between them, and Grain reads two of them at once. :class:`ChunkCache` keeps a
store's last decoded storage chunks (a bounded number, least recently used out) and decodes
each chunk once for all the threads that want it, so such a fit decodes each storage chunk
about once an epoch instead of up to twice. Only dense reads go through it (at least half a
storage chunk): a sparse read (the checks' sample) reads its rows alone, as without a cache. How
many chunks it keeps follows the shuffle (:meth:`~aimz_trainer.data.BlockShuffle.cached_rows`).

A chunk of a Zarr array in a local directory, stored as its bytes or compressed by one codec, is
read straight from its file into the cache (:func:`chunk_file_reader`): zarr's own read of such a
chunk spends most of its time outside the file and the decompression (its event loop, a copy
into the result), about four times the read itself for a chunk stored uncompressed.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from aimz_trainer.errors import DataError
from aimz_trainer.records import RecordColumn

__all__ = ["ChunkCache", "cache_storage_chunks", "chunk_file_reader", "read_rows", "storage_chunk_rows"]


def read_rows(source: Any, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` (any shape, order and repeats) of ``source``, shaped
    ``(*indices.shape, *row_shape)``: each distinct row is read once, in increasing order,
    and each run of consecutive rows with one slice ``source[start:stop]`` (on disk a few
    large reads rather than one per row). A chunked store (``source.chunks``, as a
    ``zarr.Array`` has) is read once per storage chunk touched, from the first row wanted in it
    to the last, runs over whole chunks as one slice; through a :class:`ChunkCache`, dense reads
    take whole chunks from its cache. NumPy arrays, memory-mapped ones included, are gathered
    with ``np.take``.

    Example:
        >>> class Counted:
        ...     def __init__(self, array):
        ...         self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []
        ...     def __getitem__(self, rows): self.reads.append((rows.start, rows.stop)); return self.array[rows]
        >>> source = Counted(np.arange(10) * 10)
        >>> read_rows(source, np.array([[7, 2], [3, 2]])).tolist(), source.reads
        ([[70, 20], [30, 20]], [(2, 4), (7, 8)])
    """
    if isinstance(source, np.ndarray):
        return np.asarray(np.take(source, indices, axis=0))
    if isinstance(source, RecordColumn):  # records, not rows of an array: read once for every column
        return source.take(indices)
    flat = indices.ravel()
    if flat.size == 0:
        return np.empty((*indices.shape, *source.shape[1:]), np.dtype(source.dtype))
    cached = isinstance(source, ChunkCache)
    chunk_rows = storage_chunk_rows(source)
    starts, stops, segments = _chunk_spans(flat, chunk_rows) if chunk_rows else _run_spans(flat)
    if not cached:
        starts, stops, segments = _joined(starts, stops, segments)
    read: Callable[[int, int], np.ndarray] = source.read_span if cached else functools.partial(read_slice, source)
    # segments: runs of consecutive places of the result whose rows lie in one span, grouped
    # by span. A batch's rows are sorted, so its rows of one span are one run, copied with one
    # np.take straight into the result: one pass over the data, and one span held at a time.
    segment_starts, segment_spans = segments
    segment_stops = np.append(segment_starts[1:], flat.size)
    by_span = np.argsort(segment_spans, kind="stable")
    bounds = np.searchsorted(segment_spans[by_span], np.arange(len(starts) + 1))
    values: np.ndarray | None = None
    for span, (start, stop) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
        block = read(start, stop)
        if values is None:
            values = np.empty((flat.size, *block.shape[1:]), block.dtype)
        for segment in by_span[bounds[span] : bounds[span + 1]]:
            first, last = segment_starts[segment], segment_stops[segment]
            # "clip" takes without a buffered copy; every row lies in [start, stop) by construction.
            np.take(block, flat[first:last] - start, axis=0, out=values[first:last], mode="clip")
    assert values is not None  # flat is not empty: one span at least
    return values.reshape((*indices.shape, *values.shape[1:]))


def read_slice(source: Any, start: int, stop: int) -> np.ndarray:
    """``source[start:stop]`` as an array, checked to hold ``stop - start`` rows."""
    block = np.asarray(source[start:stop])
    if len(block) != stop - start:
        raise DataError(
            f"a data source returned {len(block)} rows for source[{start}:{stop}]: a source must return "
            "source[start:stop] as an array of stop - start rows."
        )
    return block


def storage_chunk_rows(source: Any) -> int | None:
    """Rows of one storage chunk of a chunked store (a ``zarr.Array``'s ``chunks[0]``), else ``None``."""
    chunks = getattr(source, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int | np.integer) and chunks[0] > 0:
        return int(chunks[0])
    return None


class ChunkCache:
    """A chunked store read through a cache of its last ``max_chunks`` decoded storage chunks
    (at most ``max_bytes``).

    A lazy source itself (``shape``, ``dtype``, ``chunks``, slicing passed to the store), read
    by :func:`read_rows`: a span of at least half a storage chunk is served from the chunk,
    decoded whole once (by the first thread that wants it; the others wait for it), a smaller
    span is read alone. Thread-safe. A chunk of a local Zarr array is read from its file where
    :func:`chunk_file_reader` can, any other through the source.

    Example:
        >>> store = np.arange(8) * 10
        >>> class Chunked:
        ...     shape, dtype, chunks, reads = store.shape, store.dtype, (4,), []
        ...     def __getitem__(self, rows): self.reads.append((rows.start, rows.stop)); return store[rows]
        >>> source = Chunked()
        >>> cache = ChunkCache(source, max_chunks=2)
        >>> read_rows(cache, np.array([1, 3, 2])).tolist(), read_rows(cache, np.array([0, 2])).tolist()
        ([10, 30, 20], [0, 20])
        >>> source.reads  # chunk 0 decoded once, served twice
        [(0, 4)]
    """

    def __init__(self, source: Any, *, max_chunks: int) -> None:
        chunk_rows = storage_chunk_rows(source)
        if chunk_rows is None:
            raise TypeError(f"ChunkCache needs a chunked store (source.chunks); got {type(source).__name__}")
        self.source = source
        self.shape = tuple(int(size) for size in source.shape)
        self.dtype = np.dtype(source.dtype)
        self.chunks = source.chunks
        self._chunk_rows = chunk_rows
        self._read_file = chunk_file_reader(source)
        self.max_chunks = max(1, int(max_chunks))
        self._lock = threading.Lock()
        self._decoded: OrderedDict[int, Future[np.ndarray]] = OrderedDict()

    def __getitem__(self, rows: Any) -> Any:
        return self.source[rows]

    @property
    def max_bytes(self) -> int:
        """The bytes of ``max_chunks`` decoded storage chunks."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return self.max_chunks * self._chunk_rows * row_bytes

    def read_span(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``, all in one storage chunk."""
        if 2 * (stop - start) < self._chunk_rows:
            return read_slice(self.source, start, stop)
        first = start - start % self._chunk_rows
        return self._chunk(first // self._chunk_rows)[start - first : stop - first]

    def _chunk(self, index: int) -> np.ndarray:
        with self._lock:
            decoding = self._decoded.get(index)
            if decoding is not None:
                self._decoded.move_to_end(index)
                decodes = False
            else:
                decoding = self._decoded[index] = Future()
                decodes = True  # this thread decodes it; the others wait for its result
                while len(self._decoded) > self.max_chunks:
                    self._decoded.popitem(last=False)  # its waiters hold their future
        if decodes:
            first = index * self._chunk_rows
            stop = min(first + self._chunk_rows, self.shape[0])
            try:
                stored = self._read_file(index) if self._read_file is not None else None
                decoding.set_result(read_slice(self.source, first, stop) if stored is None else stored[: stop - first])
            except BaseException as error:
                with self._lock:
                    if self._decoded.get(index) is decoding:
                        del self._decoded[index]  # a later read tries again
                decoding.set_exception(error)
        return decoding.result()


def chunk_file_reader(source: Any) -> Callable[[int], np.ndarray | None] | None:
    """A reader of storage chunk ``index`` of ``source`` straight from its file, where ``source``
    is a ``zarr.Array`` in a local directory whose chunks hold whole rows of a plain numeric dtype
    in native byte order and C order, stored as their bytes or compressed by one codec: any
    compressor of Zarr v2 (no filters), Zstd, Gzip or Blosc in Zarr v3 (no sharding, no
    transpose). ``None`` for any other source.

    The reader returns the whole stored chunk (the last one padded to the chunk's rows, as Zarr
    stores it), or ``None`` where the chunk's file is missing, not the chunk's size or does not
    decode: zarr's own read then gives what it gives (the fill value, an error).

    Example:
        >>> import tempfile, zarr
        >>> directory = tempfile.mkdtemp()
        >>> array = zarr.create_array(f"{directory}/x.zarr", shape=(5, 2), chunks=(2, 2), dtype="f4")
        >>> array[:] = np.arange(10).reshape(5, 2)
        >>> read = chunk_file_reader(array)
        >>> read(2).tolist(), read is not None
        ([[8.0, 9.0], [0.0, 0.0]], True)
    """
    zarr = sys.modules.get("zarr")
    if zarr is None or not isinstance(source, zarr.Array):
        return None
    store, metadata, dtype = source.store_path.store, source.metadata, np.dtype(source.dtype)
    chunk_shape = tuple(int(size) for size in source.chunks)
    if not (
        isinstance(store, zarr.storage.LocalStore)
        and dtype.kind in "biufc"
        and dtype.isnative
        and chunk_shape[1:] == tuple(source.shape[1:])
        and not source.filters
        and len(source.compressors) <= 1
    ):
        return None
    if metadata.zarr_format == 2:
        if metadata.order != "C":
            return None
        decompressor = source.compressors[0] if source.compressors else None  # numcodecs' own codec
    else:
        serializer, *compressors = metadata.codecs  # no filters: the bytes codec comes first
        if (
            metadata.storage_transformers
            or not isinstance(serializer, zarr.codecs.BytesCodec)  # a sharding codec stores several chunks a file
            or serializer.endian not in (None, sys.byteorder)
        ):
            return None
        decompressor = _numcodecs_decompressor(compressors[0]) if compressors else None
        if compressors and decompressor is None:
            return None
    directory = Path(store.root) / source.store_path.path
    return functools.partial(_read_chunk_file, directory, metadata.encode_chunk_key, chunk_shape, dtype, decompressor)


def _numcodecs_decompressor(codec: Any) -> Any:
    """The numcodecs codec that decodes what Zarr v3's ``codec`` encoded (zarr's own codecs
    wrap these), or ``None``."""
    import numcodecs
    import zarr

    decoder = {
        zarr.codecs.ZstdCodec: numcodecs.Zstd,
        zarr.codecs.GzipCodec: numcodecs.GZip,
        zarr.codecs.BloscCodec: numcodecs.Blosc,
    }.get(type(codec))
    return decoder() if decoder is not None else None


_buffer_thread: tuple[int, ThreadPoolExecutor] | None = None
_buffer_thread_lock = threading.Lock()


def _chunk_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty array allocated on this process's one thread for chunk buffers. glibc's malloc
    gives each thread an arena of its own and returns a freed buffer to the arena it came from:
    chunks allocated on Grain's several threads left holes in several arenas, ~250 MB more
    resident memory in a fit of 20 million rows than with them all allocated on one thread."""
    global _buffer_thread
    with _buffer_thread_lock:
        if _buffer_thread is None or _buffer_thread[0] != os.getpid():  # a forked child has no thread of its own yet
            _buffer_thread = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="aimz_trainer-chunk-buffers"))
        allocate = _buffer_thread[1]
    return allocate.submit(np.empty, shape, dtype).result()


def _read_chunk_file(
    directory: Path,
    chunk_key: Callable[[tuple[int, ...]], str],
    chunk_shape: tuple[int, ...],
    dtype: np.dtype,
    decompressor: Any,
    index: int,
) -> np.ndarray | None:
    try:
        with open(directory / chunk_key((index, *[0] * (len(chunk_shape) - 1))), "rb") as file:
            return _chunk_from_file(file, chunk_shape, dtype, decompressor)
    except FileNotFoundError:
        return None


def _chunk_from_file(file: Any, chunk_shape: tuple[int, ...], dtype: np.dtype, decompressor: Any) -> np.ndarray | None:
    nbytes = int(np.prod(chunk_shape)) * dtype.itemsize
    if decompressor is None:
        if os.fstat(file.fileno()).st_size != nbytes:
            return None
        chunk = _chunk_buffer(chunk_shape, dtype)
        return chunk if file.readinto(memoryview(chunk).cast("B")) == nbytes else None
    try:
        decoded = np.frombuffer(decompressor.decode(file.read()), np.uint8)
    except Exception:  # corrupt: zarr's own read reports it
        return None
    if decoded.nbytes != nbytes:
        return None
    chunk = _chunk_buffer(chunk_shape, dtype)
    memoryview(chunk).cast("B")[:] = decoded
    return chunk


def cache_storage_chunks(arrays: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """``arrays`` with each chunked store behind a :class:`ChunkCache` of the storage chunks
    that hold about ``rows`` rows, two chunks at least.

    Example:
        >>> class Chunked:
        ...     shape, dtype, chunks = (100, 3), np.dtype(np.float32), (10, 3)
        ...     def __getitem__(self, rows): return np.zeros((100, 3), np.float32)[rows]
        >>> cached = cache_storage_chunks({"X": Chunked(), "y": np.zeros(100)}, rows=45)
        >>> type(cached["X"]).__name__, type(cached["y"]).__name__
        ('ChunkCache', 'ndarray')
    """
    return {
        key: ChunkCache(array, max_chunks=max(2, -(-rows // chunk_rows)))
        if (chunk_rows := storage_chunk_rows(array)) is not None
        else array
        for key, array in arrays.items()
    }


Segments = tuple[np.ndarray, np.ndarray]  # (first place of each run of the result, its span)


def _chunk_spans(flat: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, Segments]:
    """One span per storage chunk touched by rows ``flat``, from its first row wanted to its
    last (the rows between cost no extra decoding), and the segments of ``flat`` in each:
    without sorting the rows."""
    chunks = flat // chunk_rows
    segment_starts = np.concatenate([[0], np.flatnonzero(np.diff(chunks)) + 1])
    touched, segment_spans = np.unique(chunks[segment_starts], return_inverse=True)
    starts = np.full(len(touched), np.iinfo(flat.dtype).max, flat.dtype)
    stops = np.zeros(len(touched), flat.dtype)
    np.minimum.at(starts, segment_spans, np.minimum.reduceat(flat, segment_starts))
    np.maximum.at(stops, segment_spans, np.maximum.reduceat(flat, segment_starts) + 1)
    return starts, stops, (segment_starts, segment_spans)


def _run_spans(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, Segments]:
    """One span per run of consecutive rows wanted, and the segments of ``flat`` in each."""
    rows = np.unique(flat)
    breaks = np.flatnonzero(np.diff(rows) > 1) + 1
    starts, stops = rows[np.concatenate([[0], breaks])], rows[np.append(breaks - 1, len(rows) - 1)] + 1
    span_of = np.searchsorted(stops, flat, side="right")
    segment_starts = np.concatenate([[0], np.flatnonzero(np.diff(span_of)) + 1])
    return starts, stops, (segment_starts, span_of[segment_starts])


def _joined(starts: np.ndarray, stops: np.ndarray, segments: Segments) -> tuple[np.ndarray, np.ndarray, Segments]:
    """Spans that meet (whole runs over several storage chunks) as one slice."""
    new_span = np.concatenate([[0], np.cumsum(starts[1:] != stops[:-1])])
    firsts = np.flatnonzero(np.diff(new_span, prepend=-1))
    lasts = np.append(firsts[1:] - 1, len(starts) - 1)
    segment_starts, segment_spans = segments
    return starts[firsts], stops[lasts], (segment_starts, new_span[segment_spans])
