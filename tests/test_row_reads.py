"""Reading rows of lazy sources: :func:`read_rows` against NumPy's own indexing for any rows of any
source kind, how many reads it makes, and :class:`ChunkCache`: each storage chunk decoded once
for every thread that wants it, least recently used out, sparse reads past it, errors passed to
every waiter; a fit from a chunked store decodes each storage chunk about once an epoch; chunks of
a local Zarr store read straight from their files equal zarr's own read, in every layout."""

from __future__ import annotations

import tempfile
import threading
import time

import jax
import numcodecs
import numpy as np
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from aimz_trainer import BlockShuffle, Trainer
from aimz_trainer.row_reads import ChunkCache, cache_storage_chunks, chunk_file_reader, read_rows

from .conftest import linear_data, linear_svi


class Store:
    """A lazy source over ``values`` that records every slice read; ``chunks`` when chunked."""

    def __init__(self, values: np.ndarray, chunk_rows: int | None = None, delay: float = 0.0) -> None:
        self.values, self.shape, self.dtype = values, values.shape, values.dtype
        if chunk_rows is not None:
            self.chunks = (chunk_rows, *values.shape[1:])
        self.delay = delay
        self.reads: list[tuple[int, int]] = []
        self.fail_next = False
        self._lock = threading.Lock()

    def __getitem__(self, rows: slice) -> np.ndarray:
        assert isinstance(rows, slice) and rows.step is None, rows
        with self._lock:
            self.reads.append((rows.start, rows.stop))
            failing, self.fail_next = self.fail_next, False
        time.sleep(self.delay)  # long enough for other threads to want the same chunk meanwhile
        if failing:
            raise OSError("the disk went away")
        return self.values[rows].copy()


@st.composite
def sources_and_rows(draw):
    num_rows = draw(st.integers(1, 300))
    row_shape = draw(st.sampled_from([(), (3,), (2, 2)]))
    values = np.arange(num_rows * int(np.prod(row_shape)), dtype=np.float32).reshape(num_rows, *row_shape)
    kind = draw(st.sampled_from(["runs", "chunked", "cached"]))
    chunk_rows = None if kind == "runs" else draw(st.integers(1, 64))
    shape = draw(st.sampled_from([(), (5,), (3, 4), (2, 0)]))
    rows = draw(st.lists(st.integers(0, num_rows - 1), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    indices = np.array(rows, dtype=draw(st.sampled_from([np.int32, np.int64]))).reshape(shape)
    store = Store(values, chunk_rows)
    source = ChunkCache(store, max_chunks=draw(st.integers(1, 8))) if kind == "cached" else store
    return store, source, indices


@settings(max_examples=300, deadline=None)
@given(sources_and_rows())
def test_read_rows_equals_numpy_indexing_for_any_rows_of_any_source(case):
    store, source, indices = case
    values = read_rows(source, indices)
    np.testing.assert_array_equal(values, store.values[indices], strict=True)
    wanted = set(np.unique(indices).tolist())
    read = [row for start, stop in store.reads for row in range(start, stop)]
    assert wanted <= set(read)
    if not hasattr(store, "chunks"):  # runs of consecutive rows: each wanted row once, nothing else
        assert sorted(read) == sorted(wanted)
    elif not isinstance(source, ChunkCache):  # spans of the chunks touched: no row read twice
        assert len(read) == len(set(read))
        assert {row // store.chunks[0] for row in read} == {row // store.chunks[0] for row in wanted}


def test_a_dense_read_decodes_whole_chunks_once_and_a_sparse_one_reads_its_span():
    store = Store(np.arange(100, dtype=np.float32), chunk_rows=10)
    cache = ChunkCache(store, max_chunks=3)
    np.testing.assert_array_equal(read_rows(cache, np.array([[12, 18], [25, 14]])), [[12, 18], [25, 14]])
    assert store.reads == [(10, 20), (25, 26)]  # chunk 1 spans 7 of its 10 rows: whole; chunk 2 one row
    read_rows(cache, np.array([19, 11, 15]))
    assert store.reads == [(10, 20), (25, 26)]  # served from the cache
    read_rows(cache, np.arange(30, 60))  # chunks 3, 4, 5: chunk 1 is the least recently used, out
    read_rows(cache, np.array([11, 19]))
    assert store.reads[-4:] == [(30, 40), (40, 50), (50, 60), (10, 20)]


def test_threads_wanting_one_chunk_wait_for_a_single_decode():
    store = Store(np.arange(4000, dtype=np.float32).reshape(1000, 4), chunk_rows=100, delay=0.05)
    cache = ChunkCache(store, max_chunks=10)
    indices = np.random.default_rng(0).permutation(1000)[:600].reshape(6, 100)
    results = [None] * 8

    def read(i):
        results[i] = read_rows(cache, indices)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_array_equal(result, store.values[indices])
    assert sorted(store.reads) == [(start, start + 100) for start in range(0, 1000, 100)]


def test_a_failed_decode_reaches_every_waiter_and_the_next_read_tries_again():
    store = Store(np.arange(20, dtype=np.float32), chunk_rows=10, delay=0.05)
    cache = ChunkCache(store, max_chunks=2)
    store.fail_next = True
    errors = []

    def read():
        try:
            read_rows(cache, np.arange(10))
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 3 and store.reads == [(0, 10)]
    np.testing.assert_array_equal(read_rows(cache, np.arange(10)), np.arange(10))
    assert store.reads == [(0, 10), (0, 10)]


def test_each_store_keeps_the_chunks_of_the_rows_asked_for_two_at_least():
    wide = Store(np.zeros((1000, 99), np.float32), chunk_rows=10)
    narrow = Store(np.zeros(1000, np.float32), chunk_rows=30)
    in_memory = np.zeros(1000)
    cached = cache_storage_chunks({"X": wide, "y": narrow, "z": in_memory}, rows=100)
    assert cached["z"] is in_memory and cached["X"].source is wide and cached["y"].source is narrow
    assert (cached["X"].max_chunks, cached["y"].max_chunks) == (10, 4)
    assert (cached["X"].max_bytes, cached["y"].max_bytes) == (10 * 10 * 99 * 4, 4 * 30 * 4)
    assert cache_storage_chunks({"X": wide}, rows=0)["X"].max_chunks == 2
    assert BlockShuffle(block_rows=10, window_blocks=4).cached_rows == 100  # two and a half windows


def test_a_fit_from_a_chunked_store_decodes_each_chunk_about_once_an_epoch():
    num_rows, chunk_rows = 4096, 128
    data = linear_data(num_rows)
    stores = {name: Store(values, chunk_rows) for name, values in data.items()}

    def fit(arrays):
        trainer = Trainer(max_epochs=3, rng_key=jax.random.key(0), enable_progress_bar=False)
        shuffle = BlockShuffle(block_rows=chunk_rows, window_blocks=4)
        return trainer.fit(linear_svi(num_rows), arrays, batch_size=256, data_placement="host", shuffle=shuffle)

    reference, result = fit(data), fit(stores)
    np.testing.assert_array_equal(result.losses, reference.losses, strict=True)
    num_chunks = num_rows // chunk_rows
    for name, store in stores.items():
        # Besides the checks' sample (16 runs of 64 rows: shorter spans), the fit's
        # reads are whole chunks: each decoded about once an epoch for 3 epochs, though the
        # compiled chunks of 50 steps straddle the windows of 4 blocks (2 steps).
        whole = [read for read in store.reads if read[1] - read[0] == chunk_rows]
        assert {start // chunk_rows for start, _ in whole} == set(range(num_chunks)), name
        assert len(whole) <= 3 * num_chunks * 1.1, (name, len(whole))


@st.composite
def zarr_layouts(draw):
    """A Zarr array's layout: format, dtype and byte order, compression, sharding, memory order,
    chunk key encoding, chunks of whole rows or not, a path inside a group, which chunks were
    written (the others read back as the fill value)."""
    zarr_format = draw(st.sampled_from([2, 3]))
    dtype = np.dtype(draw(st.sampled_from(["f4", "f8", "i4", "i1", "u2", "c8", "?"])))
    num_rows = draw(st.integers(1, 40))
    row_shape = draw(st.sampled_from([(), (3,), (2, 2)]))
    chunk_rows = draw(st.integers(1, 16))
    whole_rows = not row_shape or draw(st.booleans())
    layout = {
        "zarr_format": zarr_format,
        "dtype": dtype,
        "big_endian": dtype.itemsize > 1 and draw(st.booleans()),  # stored big-endian
        "shape": (num_rows, *row_shape),
        "chunks": (chunk_rows, *(row_shape if whole_rows else (1,) * len(row_shape))),
        "compressor": draw(st.sampled_from(["none", "zstd", "gzip", "blosc"] + ["crc32c"] * (zarr_format == 3))),
        "order": draw(st.sampled_from("CF")),
        "separator": draw(st.sampled_from("/.")),
        "sharded": zarr_format == 3 and draw(st.booleans()),
        "path": draw(st.sampled_from(["x", "group/x"])),
        "fill_value": draw(st.sampled_from([0, 7])),
        "written": draw(st.lists(st.integers(0, num_rows - 1), max_size=2).map(sorted)),
    }
    return layout


def create_zarr_array(directory: str, layout: dict) -> zarr.Array:
    zarr_format, dtype, serializer = layout["zarr_format"], layout["dtype"], "auto"
    if layout["big_endian"] and zarr_format == 2:
        dtype = dtype.newbyteorder(">")
    elif layout["big_endian"]:
        serializer = zarr.codecs.BytesCodec(endian="big")
    if zarr_format == 2:
        kinds = {"zstd": numcodecs.Zstd, "gzip": numcodecs.GZip, "blosc": numcodecs.Blosc}
        encoding = {"name": "v2", "separator": layout["separator"]}
    else:
        kinds = {"zstd": zarr.codecs.ZstdCodec, "gzip": zarr.codecs.GzipCodec, "blosc": zarr.codecs.BloscCodec}
        kinds["crc32c"] = zarr.codecs.Crc32cCodec  # a checksum: not one the reader decodes
        encoding = {"name": "default", "separator": layout["separator"]}
    compressors = kinds[layout["compressor"]]() if layout["compressor"] != "none" else None
    shards = tuple(2 * size for size in layout["chunks"]) if layout["sharded"] else None
    array = zarr.open_group(f"{directory}/store.zarr", mode="w", zarr_format=zarr_format).create_array(
        layout["path"],
        shape=layout["shape"],
        chunks=layout["chunks"],
        shards=shards,
        dtype=dtype,
        serializer=serializer,
        compressors=compressors,
        order=layout["order"] if zarr_format == 2 else None,
        # every chunk written is stored, even one equal to the fill value
        config={"write_empty_chunks": True} | ({"order": layout["order"]} if zarr_format == 3 else {}),
        chunk_key_encoding=encoding,
        fill_value=layout["fill_value"],
    )
    values = (np.arange(np.prod(layout["shape"])) % 100).reshape(layout["shape"]).astype(dtype)
    if layout["written"] == []:
        array[:] = values
    else:  # two slices at most written: the chunks between read back as the fill value
        start, stop = layout["written"][0], layout["written"][-1] + 1
        array[start:stop] = values[start:stop]
    return zarr.open_array(f"{directory}/store.zarr/{layout['path']}", mode="r")


@settings(max_examples=120, deadline=None)
@given(zarr_layouts())
def test_chunks_read_from_their_files_equal_zarrs_own_read_in_every_layout(layout):
    with tempfile.TemporaryDirectory() as directory:
        array = create_zarr_array(directory, layout)
        expected = array[:]
        direct = (
            layout["compressor"] != "crc32c"
            and not layout["sharded"]
            and not layout["big_endian"]
            and tuple(array.chunks[1:]) == tuple(array.shape[1:])
            and (layout["order"] == "C" or layout["zarr_format"] == 3)  # Zarr v3 stores C order always
        )
        read_file = chunk_file_reader(array)
        assert (read_file is not None) == direct, layout
        cache = ChunkCache(array, max_chunks=2)
        chunk_rows = array.chunks[0]
        from_files = 0
        for first in range(0, len(expected), chunk_rows):
            stop = min(first + chunk_rows, len(expected))
            np.testing.assert_array_equal(cache.read_span(first, stop), expected[first:stop], strict=True)
            stored = read_file(first // chunk_rows) if read_file is not None else None
            if stored is not None:
                from_files += 1
                assert stored.shape == array.chunks and stored.dtype == expected.dtype
                np.testing.assert_array_equal(stored[: stop - first], expected[first:stop], strict=True)
        if direct and layout["written"] == []:
            assert from_files == -(-len(expected) // chunk_rows)  # every chunk written: every one from its file


def test_a_chunk_file_of_the_wrong_size_or_that_does_not_decode_is_left_to_zarr():
    with tempfile.TemporaryDirectory() as directory:
        raw = zarr.create_array(f"{directory}/raw.zarr", shape=(8, 2), chunks=(4, 2), dtype="f4", compressors=None)
        zstd = zarr.create_array(f"{directory}/zstd.zarr", shape=(8, 2), chunks=(4, 2), dtype="f4")
        for array in raw, zstd:
            array[:] = np.arange(16).reshape(8, 2)
        read_raw, read_zstd = chunk_file_reader(raw), chunk_file_reader(zstd)
        with open(f"{directory}/raw.zarr/c/1/0", "ab") as chunk_file:
            chunk_file.write(b"more")
        with open(f"{directory}/zstd.zarr/c/1/0", "r+b") as chunk_file:
            chunk_file.write(b"not zstd")
        assert read_raw(1) is None and read_raw(0).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert read_zstd(1) is None and read_zstd(0).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert read_raw(2) is None  # no such chunk: zarr gives the fill value
        assert chunk_file_reader(np.zeros((8, 2))) is None
