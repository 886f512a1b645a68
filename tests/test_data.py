"""The Grain chunk pipeline: validation, epoch orders, process shares, host gathering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aimz_trainer.data import (
    ChunkSource,
    FitPlan,
    default_steps_per_chunk,
    make_chunk_loader,
    resolve_placement,
    validate_batch_size,
    validate_data,
)
from aimz_trainer.errors import ConfigurationError, DataError


def plan(n=1000, batch=100, *, drop_last=False, epochs=3, steps=None, chunk=None) -> FitPlan:
    return FitPlan.create(n, batch, drop_last=drop_last, max_epochs=epochs, max_steps=steps, steps_per_chunk=chunk)


def source(p: FitPlan, *, seed=(1, 2), shuffle=True, process_index=0, process_count=1) -> ChunkSource:
    return ChunkSource(p, seed=list(seed), shuffle=shuffle, process_index=process_index, process_count=process_count)


def epoch_batches(src: ChunkSource, p: FitPlan, epoch: int) -> np.ndarray:
    """All index batches of one epoch, shape (steps_per_epoch, local batch)."""
    chunks = [src[i]["indices"] for i in range(len(src)) if p.chunk(i)[0] == epoch]
    return np.concatenate(chunks)


class TestValidateData:
    def test_accepts_numpy_jax_and_lists(self):
        arrays, n = validate_data({"a": np.zeros((5, 2)), "b": jnp.ones(5), "c": [1, 2, 3, 4, 5]})
        assert n == 5
        assert isinstance(arrays["a"], np.ndarray) and isinstance(arrays["b"], jax.Array)
        assert arrays["c"].shape == (5,)

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ([1, 2], "must be a mapping"),
            ({}, "is empty"),
            ({"x": np.zeros(3), "y": np.zeros(4)}, r"same number of rows; got lengths \{'x': 3, 'y': 4\}"),
            ({"x": np.zeros(0)}, "no rows"),
            ({"x": np.array(["a", "b"])}, r"train_data\['x'\] has dtype <U1; expected a boolean, integer or floating"),
            ({"x": np.array([{}, {}], dtype=object)}, "dtype object"),
            ({"x": np.float32(1.0)}, "is a scalar"),
            ({"not a name": np.zeros(3)}, "keyword names"),
        ],
    )
    def test_rejects_bad_data_naming_the_problem(self, data, message):
        with pytest.raises(DataError, match=message):
            validate_data(data)


class TestValidateBatchSize:
    @pytest.mark.parametrize("batch_size", [0, -3, 11])
    def test_out_of_range(self, batch_size):
        with pytest.raises(ConfigurationError, match=r"batch_size must be between 1 and the number of rows \(10\)"):
            validate_batch_size(batch_size, 10, 1)

    def test_not_an_int(self):
        with pytest.raises(ConfigurationError, match="batch_size must be an int; got 2.5"):
            validate_batch_size(2.5, 10, 1)

    def test_must_split_over_devices_and_names_nearest_sizes(self):
        with pytest.raises(ConfigurationError, match=r"nearest valid sizes are \[8, 12\]"):
            validate_batch_size(10, 100, 4)
        assert validate_batch_size(12, 100, 4) == 12


class TestFitPlan:
    def test_partial_batch_is_completed_by_default(self):
        p = plan(1050, 100)
        assert p.steps_per_epoch == 11 and p.total_steps == 33

    def test_drop_last(self):
        assert plan(1050, 100, drop_last=True).steps_per_epoch == 10

    def test_max_steps_cuts_the_fit(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        assert p.total_steps == 25
        steps = [p.chunk(i) for i in range(p.num_chunks)]
        assert sum(length for _, _, length in steps) == 25
        assert [first for _, first, _ in steps] == [0, 4, 8, 10, 14, 18, 20, 24]
        assert p.chunk_lengths() == {4, 2, 1}

    def test_chunks_never_cross_epochs(self):
        p = plan(1000, 100, epochs=3, chunk=4)
        for i in range(p.num_chunks):
            epoch, first, length = p.chunk(i)
            assert first // 10 == epoch == (first + length - 1) // 10
        assert p.chunk_lengths() == {4, 2}

    def test_default_chunk_prefers_a_divisor_of_the_epoch(self):
        assert default_steps_per_chunk(500) == 50
        assert default_steps_per_chunk(480) == 48
        assert default_steps_per_chunk(30) == 30
        assert default_steps_per_chunk(53 * 2) == 50  # no divisor in [25, 50]: remainder chunk


class TestChunkSource:
    def test_every_row_once_per_epoch(self):
        p = plan(1000, 100, chunk=3)
        src = source(p)
        for epoch in range(3):
            rows = epoch_batches(src, p, epoch)
            assert rows.shape == (10, 100)
            np.testing.assert_array_equal(np.sort(rows.ravel()), np.arange(1000))

    def test_partial_batch_completed_from_the_epoch_start(self):
        p = plan(1050, 100)
        src = source(p)
        rows = epoch_batches(src, p, 0)
        assert rows.shape == (11, 100)
        counts = np.bincount(rows.ravel(), minlength=1050)
        assert counts.min() == 1 and counts.sum() == 1100
        assert set(np.flatnonzero(counts == 2)) == set(src.epoch_order(0)[:50])

    def test_drop_last_sees_different_rows_each_epoch(self):
        p = plan(1050, 100, drop_last=True)
        src = source(p)
        seen = [set(epoch_batches(src, p, e).ravel()) for e in range(3)]
        assert all(len(s) == 1000 for s in seen)
        assert seen[0] != seen[1]

    def test_order_changes_every_epoch_and_repeats_with_the_seed(self):
        p = plan()
        first, again, other = source(p), source(p), source(p, seed=(9, 9))
        e0, e1 = epoch_batches(first, p, 0), epoch_batches(first, p, 1)
        assert not np.array_equal(e0, e1)
        np.testing.assert_array_equal(e0, epoch_batches(again, p, 0))
        np.testing.assert_array_equal(e1, epoch_batches(again, p, 1))
        assert not np.array_equal(e0, epoch_batches(other, p, 0))

    def test_no_shuffle_walks_rows_in_order(self):
        p = plan(1000, 100)
        np.testing.assert_array_equal(epoch_batches(source(p, shuffle=False), p, 1).ravel(), np.arange(1000))

    def test_rows_within_a_batch_are_sorted(self):
        p = plan()
        rows = epoch_batches(source(p), p, 0)
        assert np.all(np.diff(rows, axis=1) > 0)

    def test_processes_split_every_global_batch(self):
        p = plan(1000, 100, chunk=4)
        whole = source(p)
        parts = [source(p, process_index=i, process_count=4) for i in range(4)]
        for index in range(len(whole)):
            pieces = [part[index]["indices"] for part in parts]
            assert all(piece.shape[1] == 25 for piece in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole[index]["indices"])


class TestLoader:
    def test_grain_loader_yields_index_chunks_in_order(self):
        p = plan(1000, 100, chunk=4)
        src = source(p)
        records = list(make_chunk_loader(src, None))
        assert len(records) == p.num_chunks
        for index, record in enumerate(records):
            np.testing.assert_array_equal(record["indices"], src[index]["indices"])

    def test_host_loader_gathers_whole_chunks_and_casts(self):
        p = plan(1000, 100, chunk=4)
        src = source(p)
        x = np.arange(2000, dtype=np.float64).reshape(1000, 2)
        y = np.arange(1000, dtype=np.int64)
        records = list(make_chunk_loader(src, {"x": x, "y": y}))
        for index, record in enumerate(records):
            indices = src[index]["indices"]
            assert record["x"].dtype == np.float32 and record["y"].dtype == np.int32
            np.testing.assert_array_equal(record["x"], x[indices])
            np.testing.assert_array_equal(record["y"], y[indices])


class TestPlacement:
    def test_auto_uses_the_budget(self):
        assert resolve_placement("auto", 10, 100) == "device"
        assert resolve_placement("auto", 1000, 100) == "host"
        assert resolve_placement("host", 10, 100) == "host"

    def test_unknown_placement(self):
        with pytest.raises(ConfigurationError, match="data_placement must be 'auto', 'device' or 'host'; got 'gpu'"):
            resolve_placement("gpu", 1, 1)
