"""The Grain chunk pipeline: validation, fit plans, epoch orders, process shares, host gathering."""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aimz_trainer.data import (
    ChunkSource,
    ValidationSource,
    digest_rows,
    make_chunk_loader,
    resolve_placement,
    sample_indices,
    validate_batch_size,
    validate_data,
)
from aimz_trainer.errors import ConfigurationError, DataError
from aimz_trainer.plan import Chunk, Every, FitPlan, default_steps_per_chunk, epoch_length


def plan(n=1000, batch=100, *, drop_last=False, epochs=3, steps=None, chunk=None, boundaries=()) -> FitPlan:
    return FitPlan.create(
        n,
        batch,
        drop_last=drop_last,
        max_epochs=epochs,
        max_steps=steps,
        steps_per_chunk=chunk,
        boundaries=[Every(steps=interval) for interval in boundaries],
    )


def source(p: FitPlan, *, seed=(1, 2), shuffle=True, process_index=0, process_count=1) -> ChunkSource:
    return ChunkSource(p, seed=list(seed), shuffle=shuffle, process_index=process_index, process_count=process_count)


def epoch_batches(src: ChunkSource, p: FitPlan, epoch: int) -> np.ndarray:
    """All real index batches of one epoch, shape (steps_per_epoch, local batch)."""
    parts = []
    for index, chunk in enumerate(p.chunks):
        if chunk.epoch == epoch:
            record = src[index]
            parts.append(record["indices"][: record["num_steps"]])
    return np.concatenate(parts)


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
            validate_batch_size(batch_size, 10)

    def test_not_an_int(self):
        with pytest.raises(ConfigurationError, match="batch_size must be an int; got 2.5"):
            validate_batch_size(2.5, 10)

    def test_any_size_up_to_the_rows(self):  # the devices need no divisor: batches are padded
        assert validate_batch_size(np.int64(7), 100) == 7 and validate_batch_size(100, 100) == 100


class TestEpochLength:
    @pytest.mark.parametrize(
        ("num_rows", "batch_size", "drop_last", "expected"),
        [(1000, 100, False, 10), (1000, 100, True, 10), (1050, 100, False, 11), (1050, 100, True, 10), (7, 7, True, 1)],
    )
    def test_partial_batch_completed_or_dropped(self, num_rows, batch_size, drop_last, expected):
        assert epoch_length(num_rows, batch_size, drop_last=drop_last) == expected


class TestFitPlan:
    def test_chunk_steps(self):
        chunk = Chunk(epoch=1, first_step=12, num_steps=3)
        assert chunk.steps == range(12, 15)
        assert tuple(chunk) == (1, 12, 3)

    def test_partial_batch_is_completed_by_default(self):
        p = plan(1050, 100)
        assert p.steps_per_epoch == 11 and p.total_steps == 33
        assert (p.num_rows, p.batch_size) == (1050, 100)

    def test_drop_last(self):
        p = plan(1050, 100, drop_last=True)
        assert p.steps_per_epoch == 10 and p.total_steps == 30

    def test_max_steps_cuts_the_fit(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        assert p.total_steps == 25 and p.num_chunks == len(p.chunks) == 8
        assert p.chunks == (
            Chunk(0, 0, 4),
            Chunk(0, 4, 4),
            Chunk(0, 8, 2),
            Chunk(1, 10, 4),
            Chunk(1, 14, 4),
            Chunk(1, 18, 2),
            Chunk(2, 20, 4),
            Chunk(2, 24, 1),
        )

    @pytest.mark.parametrize(("epochs", "steps", "total"), [(2, 25, 20), (3, 25, 25), (3, None, 30)])
    def test_first_limit_wins(self, epochs, steps, total):
        p = plan(1000, 100, epochs=epochs, steps=steps, chunk=4)
        assert p.total_steps == total
        assert sum(chunk.num_steps for chunk in p.chunks) == total

    def test_boundaries_cut_chunks_at_their_multiples_across_epochs(self):
        p = plan(1000, 100, epochs=2, chunk=3, boundaries=[4])
        assert [(c.first_step, c.num_steps) for c in p.chunks] == [
            (0, 3), (3, 1), (4, 3), (7, 1), (8, 2),  # epoch 0: cuts at 4, 8 and the epoch end 10
            (10, 2), (12, 3), (15, 1), (16, 3), (19, 1),  # epoch 1: cuts at 12, 16 and 20
        ]  # fmt: skip
        assert [c.epoch for c in p.chunks] == [0] * 5 + [1] * 5

    def test_boundary_longer_than_an_epoch(self):
        p = plan(1000, 100, epochs=3, chunk=50, boundaries=[15])
        assert [(c.first_step, c.num_steps) for c in p.chunks] == [(0, 10), (10, 5), (15, 5), (20, 10)]

    @pytest.mark.parametrize(
        ("n", "batch", "epochs", "steps", "chunk", "boundaries"),
        [
            (1000, 100, 3, None, 4, ()),
            (1050, 100, 4, None, 3, (5, 7)),
            (1050, 100, 2, 17, None, (6,)),
            (999, 10, 2, None, None, (50, 30)),
            (64, 8, 5, 37, 5, (3, 8, 11)),
        ],
    )
    def test_chunks_tile_the_fit_and_respect_every_cut(self, n, batch, epochs, steps, chunk, boundaries):
        p = plan(n, batch, epochs=epochs, steps=steps, chunk=chunk, boundaries=boundaries)
        if chunk is None:
            assert p.steps_per_chunk == default_steps_per_chunk(p.steps_per_epoch, boundaries)
        else:
            assert p.steps_per_chunk == chunk
        steps_run = [step for c in p.chunks for step in c.steps]
        assert steps_run == list(range(p.total_steps))  # contiguous, in order, no overlap
        cuts = {e * p.steps_per_epoch for e in range(1, math.ceil(p.total_steps / p.steps_per_epoch))}
        cuts |= {m for interval in boundaries for m in range(interval, p.total_steps, interval)}
        starts = {c.first_step for c in p.chunks}
        for c in p.chunks:
            assert 1 <= c.num_steps <= p.steps_per_chunk
            assert c.epoch == c.first_step // p.steps_per_epoch == (c.first_step + c.num_steps - 1) // p.steps_per_epoch
            assert not any(c.first_step < cut < c.first_step + c.num_steps for cut in cuts)
        assert cuts <= starts  # every epoch end and boundary multiple starts a chunk

    def test_is_epoch_end(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        ends = [p.is_epoch_end(c) for c in p.chunks]
        # at steps 10 and 20, and at the fit's end in the middle of epoch 2
        assert ends == [False, False, True, False, False, True, False, True]

    def test_default_chunk_prefers_a_divisor_of_the_epoch(self):
        assert default_steps_per_chunk(500) == 50
        assert default_steps_per_chunk(480) == 48
        assert default_steps_per_chunk(30) == 30
        assert default_steps_per_chunk(3) == 3
        assert default_steps_per_chunk(53 * 2) == 50  # no divisor in [25, 50]: remainder chunk

    def test_default_chunk_divides_the_boundaries_too(self):
        assert default_steps_per_chunk(500, [20]) == 20
        assert default_steps_per_chunk(1000, [200, 50]) == 50
        assert default_steps_per_chunk(1000, [60]) == 20  # gcd 20
        assert default_steps_per_chunk(1000, [70]) == 10  # gcd 10 = target // 5: still taken
        assert default_steps_per_chunk(100, [7]) == 50  # gcd 1 is too short: about target
        assert default_steps_per_chunk(12, [8]) == 12  # ... or the whole epoch when shorter
        assert default_steps_per_chunk(480, target=100) == 96
        assert plan(1000, 10, chunk=None, boundaries=[20]).steps_per_chunk == 20


class TestChunkSource:
    def test_record_layout_and_padding(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        src = source(p)
        assert len(src) == p.num_chunks
        for index, chunk in enumerate(p.chunks):
            record = src[index]
            assert set(record) == {"indices", "rows", "num_steps"} and record["rows"] == {}
            indices = record["indices"]
            assert indices.shape == (4, 100) and indices.dtype == np.int32
            assert isinstance(record["num_steps"], np.int32) and record["num_steps"] == chunk.num_steps
            assert (indices[chunk.num_steps :] == 0).all()
            first = chunk.first_step - chunk.epoch * p.steps_per_epoch
            expected = src.epoch_order(chunk.epoch)[first * 100 : (first + chunk.num_steps) * 100]
            np.testing.assert_array_equal(indices[: chunk.num_steps], np.sort(expected.reshape(-1, 100), axis=1))

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
        np.testing.assert_array_equal(src.epoch_order(0)[1050:], src.epoch_order(0)[:50])

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

    def test_order_does_not_depend_on_the_chunking(self):
        short, long = plan(1000, 100, chunk=3), plan(1000, 100, chunk=10, boundaries=[4])
        for epoch in range(3):
            np.testing.assert_array_equal(
                epoch_batches(source(short), short, epoch), epoch_batches(source(long), long, epoch)
            )

    def test_no_shuffle_walks_rows_in_order(self):
        p = plan(1000, 100)
        np.testing.assert_array_equal(epoch_batches(source(p, shuffle=False), p, 1).ravel(), np.arange(1000))

    def test_rows_within_a_batch_are_sorted(self):
        p = plan()
        rows = epoch_batches(source(p), p, 0)
        assert np.all(np.diff(rows, axis=1) > 0)

    def test_processes_split_every_global_batch(self):
        p = plan(1050, 100, epochs=None, steps=25, chunk=4)
        whole = source(p)
        parts = [source(p, process_index=i, process_count=4) for i in range(4)]
        for index in range(len(whole)):
            records = [part[index] for part in parts]
            assert all(r["indices"].shape == (4, 25) for r in records)
            assert all(r["num_steps"] == whole[index]["num_steps"] for r in records)
            np.testing.assert_array_equal(
                np.concatenate([r["indices"] for r in records], axis=1), whole[index]["indices"]
            )


class TestValidationSource:
    @pytest.mark.parametrize(("num_rows", "batch_size"), [(20, 8), (24, 8), (3, 8), (1, 1)])
    def test_every_row_once_with_weight_one_in_row_order(self, num_rows, batch_size):
        src = ValidationSource(num_rows, batch_size, process_index=0, process_count=1)
        assert len(src) == math.ceil(num_rows / batch_size)
        records = [src[i] for i in range(len(src))]
        for record in records:
            assert set(record) == {"indices", "rows", "weights", "num_steps"}
            assert record["indices"].shape == record["weights"].shape == (1, batch_size)
            assert record["indices"].dtype == np.int32 and record["weights"].dtype == np.float32
            assert isinstance(record["num_steps"], np.int32) and record["num_steps"] == 1
        indices = np.concatenate([r["indices"][0] for r in records])
        weights = np.concatenate([r["weights"][0] for r in records])
        positions = np.arange(len(indices))
        np.testing.assert_array_equal(indices, positions % num_rows)  # in order, wrapping around
        np.testing.assert_array_equal(weights, (positions < num_rows).astype(np.float32))
        np.testing.assert_array_equal(np.bincount(indices, weights, minlength=num_rows), np.ones(num_rows))

    def test_last_batch_wraps_with_zero_weights(self):
        src = ValidationSource(20, 8, process_index=0, process_count=1)
        last = src[2]
        np.testing.assert_array_equal(last["indices"], [[16, 17, 18, 19, 0, 1, 2, 3]])
        np.testing.assert_array_equal(last["weights"], [[1, 1, 1, 1, 0, 0, 0, 0]])

    def test_processes_split_every_batch(self):
        whole = ValidationSource(20, 8, process_index=0, process_count=1)
        parts = [ValidationSource(20, 8, process_index=i, process_count=2) for i in range(2)]
        assert all(len(part) == len(whole) == 3 for part in parts)
        for index in range(len(whole)):
            for key in ("indices", "weights"):
                pieces = [part[index][key] for part in parts]
                assert all(piece.shape == (1, 4) for piece in pieces)
                expected = whole[index][key]
                np.testing.assert_array_equal(np.concatenate(pieces, axis=1), expected)


class TestLoader:
    def test_grain_loader_yields_index_records_in_order(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        src = source(p)
        records = list(make_chunk_loader(src, None))
        assert len(records) == p.num_chunks
        for index, record in enumerate(records):
            np.testing.assert_array_equal(record["indices"], src[index]["indices"])
            assert record["num_steps"] == p.chunks[index].num_steps

    def test_host_loader_gathers_whole_chunks_pads_and_casts(self):
        p = plan(1000, 100, epochs=None, steps=25, chunk=4)
        src = source(p)
        x = np.arange(2000, dtype=np.float64).reshape(1000, 2)
        y = np.arange(1000, dtype=np.int64)
        mask = np.arange(1000) % 3 == 0
        records = list(make_chunk_loader(src, {"x": x, "y": y, "mask": mask}))
        assert len(records) == p.num_chunks
        for index, record in enumerate(records):
            num_steps = p.chunks[index].num_steps
            indices = src[index]["indices"][:num_steps]
            assert set(record) == {"indices", "rows", "num_steps"} and record["num_steps"] == num_steps
            np.testing.assert_array_equal(record["indices"], src[index]["indices"])
            rows = record["rows"]
            assert set(rows) == {"x", "y", "mask"}
            assert rows["x"].dtype == np.float32 and rows["y"].dtype == np.int32 and rows["mask"].dtype == bool
            assert rows["x"].shape == (4, 100, 2) and rows["y"].shape == rows["mask"].shape == (4, 100)
            np.testing.assert_array_equal(rows["x"][:num_steps], x[indices])
            np.testing.assert_array_equal(rows["y"][:num_steps], y[indices])
            np.testing.assert_array_equal(rows["mask"][:num_steps], mask[indices])
            for array in rows.values():
                assert not array[num_steps:].any()  # padded steps are zero

    def test_host_loader_keeps_validation_weights(self):
        src = ValidationSource(20, 8, process_index=0, process_count=1)
        x = np.arange(20, dtype=np.float64) * 10
        records = list(make_chunk_loader(src, {"x": x}))
        assert len(records) == 3
        for index, record in enumerate(records):
            assert set(record) == {"indices", "rows", "weights", "num_steps"} and record["num_steps"] == 1
            np.testing.assert_array_equal(record["weights"], src[index]["weights"])
            assert record["rows"]["x"].dtype == np.float32
            np.testing.assert_array_equal(record["rows"]["x"], x[src[index]["indices"]])
        np.testing.assert_array_equal(records[2]["rows"]["x"], [[160, 170, 180, 190, 0, 10, 20, 30]])


class TestPlacement:
    def test_auto_uses_the_budget(self):
        assert resolve_placement("auto", 10, 100) == "device"
        assert resolve_placement("auto", 1000, 100) == "host"
        assert resolve_placement("host", 10, 100) == "host"
        assert resolve_placement("device", 1000, 100) == "device"

    def test_unknown_placement(self):
        with pytest.raises(ConfigurationError, match="data_placement must be 'auto', 'device' or 'host'; got 'gpu'"):
            resolve_placement("gpu", 1, 1)


def test_digest_rows_tells_apart_a_changed_sampled_row_a_shape_and_a_name_but_not_the_order_given():
    def hexdigest(arrays):
        digest = hashlib.sha256()
        digest_rows(digest, arrays)
        return digest.hexdigest()

    X, y = np.arange(4096, dtype=np.float32).reshape(2048, 2), np.zeros(2048, np.int8)
    base = hexdigest({"X": X, "y": y})
    assert hexdigest({"y": y, "X": X}) == base  # by name, not by the order given
    changed = X.copy()
    changed[2] = -1  # a sampled row (of the first run of 64)
    assert hexdigest({"X": changed, "y": y}) != base
    assert hexdigest({"X": X[:-2], "y": y}) != base
    assert hexdigest({"X": X.astype(np.float64), "y": y}) != base
    assert hexdigest({"Z": X, "y": y}) != base
    unsampled = X.copy()
    unsampled[100] = -1  # between two runs of the sample: a sample, not every row, as documented
    assert hexdigest({"X": unsampled, "y": y}) == base


@given(num_rows=st.one_of(st.integers(0, 5000), st.integers(5000, 2**40)))
def test_the_sample_is_every_row_of_small_data_else_16_separate_runs_of_64_from_the_first_row_to_the_last(num_rows):
    rows = sample_indices(num_rows)
    if num_rows < 2048:
        np.testing.assert_array_equal(rows, np.arange(num_rows))
        return
    assert rows.shape == (1024,) and rows[0] == 0 and rows[-1] == num_rows - 1
    runs = rows.reshape(16, 64)
    np.testing.assert_array_equal(np.diff(runs, axis=1), 1)  # each run consecutive
    assert (np.diff(runs[:, 0]) > 64).all()  # the runs apart: sorted, no row twice
