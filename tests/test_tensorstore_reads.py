"""Zarr arrays read through TensorStore: the same values and dtype as Zarr's own reads for every
format, codec, layout and dtype a user's store may have, missing chunks included; Zarr's reads
kept where TensorStore would differ or cannot open the store; a fit from Zarr arrays on disk
decodes with TensorStore and equals the fit from NumPy."""

from __future__ import annotations

import jax
import numcodecs
import numpy as np
import pytest
import tensorstore
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimz_trainer import BlockShuffle, Trainer
from aimz_trainer.data import place_data
from aimz_trainer.row_reads import ChunkCache
from aimz_trainer.tensorstore_reads import opened_with_tensorstore

from .conftest import linear_data, linear_svi

V3_COMPRESSORS = {
    "none": None,
    "zstd": zarr.codecs.ZstdCodec(),
    "gzip": zarr.codecs.GzipCodec(),
    "blosc": zarr.codecs.BloscCodec(),
}
V2_COMPRESSORS = {"none": None, "zstd": numcodecs.Zstd(), "gzip": numcodecs.GZip(), "blosc": numcodecs.Blosc()}


@st.composite
def stores(draw):
    zarr_format = draw(st.sampled_from([2, 3]))
    num_rows = draw(st.integers(1, 40))
    row_shape = draw(st.sampled_from([(), (3,), (2, 2)]))
    dtype = np.dtype(draw(st.sampled_from(["int8", "uint16", "int32", "float32", "float64", "bool"])))
    chunk_rows = draw(st.integers(1, 16))
    options = {
        "compressors": (V2_COMPRESSORS if zarr_format == 2 else V3_COMPRESSORS)[
            draw(st.sampled_from(sorted(V3_COMPRESSORS)))
        ],
        "fill_value": draw(st.sampled_from([0, 1])),
    }
    if zarr_format == 2:
        options["order"] = draw(st.sampled_from(["C", "F"]))
        options["chunk_key_encoding"] = {"name": "v2", "separator": draw(st.sampled_from([".", "/"]))}
    else:
        options["chunk_key_encoding"] = {
            "name": draw(st.sampled_from(["default", "v2"])),
            "separator": draw(st.sampled_from([".", "/"])),
        }
    if zarr_format == 3 and draw(st.booleans()):  # a shard of two storage chunks
        options["shards"] = (2 * chunk_rows, *row_shape)
    written = draw(st.sets(st.integers(0, num_rows - 1)))  # rows never written read as the fill value
    in_group = draw(st.booleans())
    return zarr_format, num_rows, row_shape, dtype, chunk_rows, options, sorted(written), in_group


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=stores())
def test_tensorstore_reads_what_zarr_reads(case, tmp_path_factory):
    zarr_format, num_rows, row_shape, dtype, chunk_rows, options, written, in_group = case
    shape = (num_rows, *row_shape)
    directory = tmp_path_factory.mktemp("store")
    create = zarr.open_group(directory, mode="w", zarr_format=zarr_format).create_array if in_group else None
    if create is not None:
        array = create("x", shape=shape, chunks=(chunk_rows, *row_shape), dtype=dtype, **options)
    else:
        array = zarr.create_array(
            directory / "x.zarr",
            shape=shape,
            chunks=(chunk_rows, *row_shape),
            dtype=dtype,
            zarr_format=zarr_format,
            **options,
        )
    values = (np.arange(np.prod(shape)).reshape(shape) % 7 + 2).astype(dtype)
    for row in written:
        array[row] = values[row]
    view = opened_with_tensorstore(array)
    assert view is not None
    for start, stop in [(0, num_rows), (num_rows // 3, num_rows), (0, 1)]:
        read = view[start:stop]
        np.testing.assert_array_equal(read, array[start:stop], strict=True)
        assert read.flags.owndata  # NumPy's memory


def test_zarr_keeps_the_reads_tensorstore_would_answer_otherwise(tmp_path):
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), chunks=(2,), dtype="float32")
    big_endian = zarr.create_array(tmp_path / "big.zarr", shape=(4,), chunks=(2,), dtype=">f4")
    on_disk = zarr.create_array(tmp_path / "x.zarr", shape=(4,), chunks=(2,), dtype="float32")
    assert opened_with_tensorstore(in_memory) is None  # no file to open again
    assert opened_with_tensorstore(big_endian) is None  # TensorStore reads it in native order
    assert opened_with_tensorstore(np.zeros(4)) is None
    assert isinstance(opened_with_tensorstore(on_disk).store, tensorstore.TensorStore)
    (tmp_path / "x.zarr" / "zarr.json").unlink()  # the store went away since zarr opened it
    assert opened_with_tensorstore(on_disk) is None


def test_a_fit_from_zarr_arrays_on_disk_decodes_with_tensorstore_and_equals_the_fit_from_numpy(tmp_path):
    data = linear_data(2048)
    stores = {
        name: zarr.create_array(tmp_path / f"{name}.zarr", shape=values.shape, chunks=(128,), dtype=values.dtype)
        for name, values in data.items()
    }
    for name, values in data.items():
        stores[name][:] = values
    shuffle = BlockShuffle(block_rows=128, window_blocks=4)
    placed = place_data(stores, "host", None, shuffle=shuffle).host_arrays
    assert all(isinstance(cache, ChunkCache) for cache in placed.values())
    assert all(isinstance(cache.reader.store, tensorstore.TensorStore) for cache in placed.values())

    def fit(arrays):
        trainer = Trainer(max_epochs=2, rng_key=jax.random.key(0), enable_progress_bar=False)
        return trainer.fit(linear_svi(2048), arrays, batch_size=256, data_placement="host", shuffle=shuffle)

    reference, result = fit(data), fit(stores)
    np.testing.assert_array_equal(result.losses, reference.losses, strict=True)
    for name, values in result.params.items():
        np.testing.assert_array_equal(values, reference.params[name], strict=True)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_chunk_cache_over_tensorstore_serves_the_rows_zarr_serves(tmp_path, zarr_format):
    values = np.arange(300, dtype=np.float32).reshape(100, 3)
    array = zarr.create_array(
        tmp_path / "x.zarr", shape=values.shape, chunks=(16, 3), dtype="float32", zarr_format=zarr_format
    )
    array[:] = values
    cache = ChunkCache(array, max_chunks=2, reader=opened_with_tensorstore(array))
    for start, stop in [(0, 16), (20, 30), (5, 6), (96, 100)]:
        np.testing.assert_array_equal(cache.read_span(start, stop), values[start:stop], strict=True)
