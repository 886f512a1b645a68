"""Data larger than memory: fits from lazy sources (Zarr v3 and v2 stores, memory-mapped NumPy,
a generic sliceable object) equal the same fits from NumPy arrays, bit for bit; a source is read
by rows (each fit reads each row once an epoch, plus the checks' sample), never whole; a fit
from a Zarr store resumes exactly from its checkpoint; a prediction from a source reads it batch by
batch; two processes over loopback, reading one store, each read their half of every batch; an
ImpactModel fits and predicts from sources as from NumPy.

The data: 4,096 rows of ``linear_data``, batches of 256 (16 steps an epoch), 2 epochs. At 4,096
rows the checks' sample (:func:`~aimz_trainer.data.sample_indices`) is 16 runs of 64 rows.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import zarr

from aimz_trainer import (
    BlockShuffle,
    CheckpointError,
    ConfigurationError,
    ModelCheckpoint,
    Predictor,
    Trainer,
    make_mesh,
    open_store,
)
from aimz_trainer.data import (
    ChunkSource,
    digest_rows,
    is_lazy_source,
    read_rows,
    require_finite_rows,
    resolve_placement,
    sample_indices,
    validate_data,
)
from aimz_trainer.errors import DataError
from aimz_trainer.plan import FitPlan
from aimz_trainer.records import record_columns
from aimz_trainer.resume import data_digest

from .conftest import Recorder, linear_data, linear_model, linear_svi

NUM_ROWS, BATCH_SIZE, MAX_EPOCHS = 4096, 256, 2
STEPS = MAX_EPOCHS * NUM_ROWS // BATCH_SIZE  # 32
DATA = linear_data(NUM_ROWS)


class CountingRows:
    """A generic lazy source (``shape``, ``dtype``, row slicing) that records every read."""

    def __init__(self, source) -> None:
        self.source = source
        self.shape, self.dtype = tuple(source.shape), np.dtype(source.dtype)
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"CountingRows takes row slices only; got {rows!r}")
        start, stop, _ = rows.indices(self.shape[0])
        self.reads.append((start, stop))
        return np.asarray(self.source[start:stop])

    def rows_read(self) -> np.ndarray:
        """How many times each row was read."""
        counts = np.zeros(self.shape[0], np.int64)
        for start, stop in self.reads:
            counts[start:stop] += 1
        return counts


def sample_runs(num_rows: int) -> list[tuple[int, int]]:
    """The slices that read the checks' sample: one per run of consecutive rows."""
    rows = sample_indices(num_rows)
    breaks = np.flatnonzero(np.diff(rows) > 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def write_zarr(directory: Path, zarr_format: int) -> dict[str, zarr.Array]:
    arrays = {}
    for name, values in DATA.items():
        array = zarr.create_array(
            directory / f"{name}.zarr", shape=values.shape, chunks=(500,), dtype=values.dtype, zarr_format=zarr_format
        )
        array[:] = values
        arrays[name] = zarr.open_array(directory / f"{name}.zarr", mode="r")
    return arrays


def write_memmaps(directory: Path) -> dict[str, np.memmap]:
    for name, values in DATA.items():
        np.save(directory / f"{name}.npy", values)
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in DATA}


def sources(kind: str, directory: Path) -> dict:
    if kind == "zarr3":
        return write_zarr(directory, 3)
    if kind == "zarr2":
        return write_zarr(directory, 2)
    if kind == "memmap":
        return write_memmaps(directory)
    return {name: CountingRows(values) for name, values in DATA.items()}


def make_trainer(callbacks=(), seed: int = 0) -> Trainer:
    return Trainer(
        max_epochs=MAX_EPOCHS, rng_key=jax.random.key(seed), enable_progress_bar=False, callbacks=list(callbacks)
    )


def fit(data, callbacks=(), *, seed: int = 0, **kwargs):
    return make_trainer(callbacks, seed).fit(linear_svi(NUM_ROWS), data, batch_size=BATCH_SIZE, **kwargs)


def assert_bitwise_equal(result, reference) -> None:
    np.testing.assert_array_equal(result.losses, reference.losses, strict=True)
    assert sorted(result.params) == sorted(reference.params)
    for name, value in reference.params.items():
        np.testing.assert_array_equal(np.asarray(result.params[name]), np.asarray(value), err_msg=name, strict=True)


@pytest.fixture(scope="module")
def in_memory():
    """The reference: the same fit from the NumPy arrays, gathered on the host."""
    return fit(DATA, data_placement="host")


class TestFitFromASource:
    @pytest.mark.parametrize("kind", ["zarr3", "zarr2", "memmap", "generic"])
    def test_losses_and_params_are_those_of_the_fit_from_numpy(self, kind, in_memory, tmp_path):
        data = sources(kind, tmp_path)
        assert all(map(is_lazy_source, data.values()))
        trainer = make_trainer()
        result = trainer.fit(linear_svi(NUM_ROWS), data, batch_size=BATCH_SIZE)
        assert trainer.placement == "host"  # "auto" keeps a lazy source on the host
        assert result.losses.shape == (STEPS,)
        assert_bitwise_equal(result, in_memory)

    def test_each_row_is_read_once_an_epoch_plus_the_sample_and_the_leading_batch(self, in_memory, tmp_path):
        data = {name: CountingRows(array) for name, array in write_zarr(tmp_path, 3).items()}
        result = fit(data)
        assert_bitwise_equal(result, in_memory)
        expected = np.full(NUM_ROWS, MAX_EPOCHS)
        expected[sample_indices(NUM_ROWS)] += 1  # the NaN check before the fit
        expected[:BATCH_SIZE] += 1  # the leading batch (fixed rows the posterior draws are computed on)
        for name, source in data.items():
            np.testing.assert_array_equal(source.rows_read(), expected, err_msg=name)
        # A checkpointing fit also digests the data: from the same sample, read once for both.
        data = {name: CountingRows(array) for name, array in DATA.items()}
        fit(data, [ModelCheckpoint(tmp_path / "checkpoints")])
        np.testing.assert_array_equal(data["x"].rows_read(), expected)

    def test_validation_data_from_a_source(self, tmp_path):
        val = linear_data(600, seed=1)
        (tmp_path / "val").mkdir()
        np.save(tmp_path / "val" / "x.npy", val["x"])
        lazy_val = {"x": np.load(tmp_path / "val" / "x.npy", mmap_mode="r"), "y": CountingRows(val["y"])}
        reference = fit(DATA, data_placement="host", val_data=val)
        result = fit(DATA, val_data=lazy_val)
        assert_bitwise_equal(result, reference)
        # The check's sample first (all 600 rows: a sample of fewer than 2,048 rows is every row), then
        # batch by batch, the last batch wrapping around to the first rows.
        reads = lazy_val["y"].reads
        assert reads[0] == (0, 600)
        assert set(reads[1:]) == {(0, 256), (256, 512), (0, 168), (512, 600)}


class TestResume:
    @pytest.mark.parametrize("shuffle", [True, BlockShuffle(block_rows=128, window_blocks=4)], ids=["rows", "blocks"])
    def test_a_stopped_fit_from_zarr_resumed_from_its_checkpoint_equals_the_uninterrupted_fit(
        self, in_memory, tmp_path, shuffle
    ):
        data = write_zarr(tmp_path, 3)
        reference = in_memory if shuffle is True else fit(DATA, data_placement="host", shuffle=shuffle)
        dirpath = tmp_path / "checkpoints"
        # Chunks end at the saves: steps 8, 16, 24, 32; the third chunk ends mid-epoch 2.
        saves = ModelCheckpoint(dirpath, every_n_train_steps=8)
        stopped = fit(data, [Recorder(stop_after_chunks=3), saves], shuffle=shuffle)
        assert stopped.losses.shape == (24,)
        recorder = Recorder()
        resumed = fit(
            data, [recorder, ModelCheckpoint(dirpath, every_n_train_steps=8)], seed=5, ckpt_path="last", shuffle=shuffle
        )
        assert recorder.calls[0][:2] == ("fit_start", 24)
        assert_bitwise_equal(resumed, reference)
        if shuffle is not True:  # the exact permutation would read other batches: refused
            with pytest.raises(CheckpointError, match=r"shuffle: \{'block_rows': 128, 'window_blocks': 4\} in the"):
                fit(data, [ModelCheckpoint(dirpath, every_n_train_steps=8)], ckpt_path="last")

    def test_the_digest_of_a_source_is_that_of_the_same_data_in_memory(self, tmp_path):
        data = sources("zarr3", tmp_path)
        assert data_digest(data) == data_digest(DATA)
        changed = {**DATA, "x": DATA["x"].copy()}
        changed["x"][sample_indices(NUM_ROWS)[3]] += 1
        assert data_digest(data) != data_digest(changed)


class TestChecks:
    def test_validate_data_reads_metadata_only(self):
        source = CountingRows(np.zeros((10, 3), np.float64))
        arrays, n = validate_data({"X": source})
        assert n == 10 and arrays["X"] is source and source.reads == []

    def test_a_source_of_text_is_refused_naming_its_dtype(self):
        with pytest.raises(DataError, match=r"train_data\['X'\] has dtype <U1; expected a boolean"):
            validate_data({"X": CountingRows(np.array(["a", "b"]))})

    def test_a_nan_in_the_sample_is_found_before_the_fit(self):
        values = np.zeros(4096, np.float32)
        values[8] = np.nan
        source = CountingRows(values)
        with pytest.raises(DataError, match=r"train_data\['x'\] holds nan at row 8 \(a row of the sample"):
            require_finite_rows("train_data", {"x": source}, "fill it.")
        np.testing.assert_array_equal(np.flatnonzero(source.rows_read()), sample_indices(4096))

    def test_a_nan_outside_the_sample_stops_the_fit_when_its_chunk_is_read(self):
        data = {name: values.copy() for name, values in DATA.items()}
        data["y"][100] = np.inf
        assert 100 not in sample_indices(4096)  # between the sample's first two runs
        with pytest.raises(DataError, match=r"the lazy source 'y' holds inf at row 100"):
            fit({"x": data["x"], "y": CountingRows(data["y"])})

    def test_auto_placement_says_why_it_chose_the_host(self, caplog):
        with caplog.at_level(logging.INFO, logger="aimz_trainer.data"):
            assert resolve_placement("auto", 10, 100, lazy=True) == "host"
            assert resolve_placement("auto", 1000, 100) == "host"
            assert resolve_placement("auto", 10, 100) == "device"
        assert [record.getMessage() for record in caplog.records] == [
            "data placement 'host': the data hold a lazy source (zarr, memmap, ...), read by rows on the host, "
            "never whole",
            "data placement 'host': the data (1000 bytes) exceed the device budget (100 bytes)",
            "data placement 'device': the data (10 bytes) fit the device budget (100 bytes)",
        ]


def test_read_rows_reads_each_distinct_row_once_in_runs():
    values = np.arange(40, dtype=np.float32).reshape(20, 2)
    source = CountingRows(values)
    indices = np.array([[9, 3, 4, 5], [3, 17, 18, 0]])
    np.testing.assert_array_equal(read_rows(source, indices), values[indices])
    assert source.reads == [(0, 1), (3, 6), (9, 10), (17, 19)]


def test_read_rows_of_a_chunked_store_reads_each_chunk_touched_once():
    values = np.arange(60, dtype=np.float32).reshape(30, 2)
    source = CountingRows(values)
    source.chunks = (10, 2)  # as a zarr.Array of 10-row chunks says
    indices = np.array([[2, 7, 5], [12, 13, 14], [15, 16, 17], [18, 19, 29], [20, 21, 22], [23, 24, 25], [26, 27, 28]])
    np.testing.assert_array_equal(read_rows(source, indices), values[indices])
    # Chunk 0 from row 2 to 7 (3, 4, 6 read, not used); chunks 1 and 2 from row 12 to the end, in one slice.
    assert source.reads == [(2, 8), (12, 30)]


def test_digest_rows_of_a_memmap_and_a_generic_source_match_numpy(tmp_path):
    def hexdigest(arrays):
        digest = hashlib.sha256()
        digest_rows(digest, arrays)
        return digest.hexdigest()

    memmaps = write_memmaps(tmp_path)
    generic = {name: CountingRows(values) for name, values in DATA.items()}
    assert hexdigest(memmaps) == hexdigest(generic) == hexdigest(DATA)


class TestBlockShuffle:
    def test_an_epoch_order_is_a_permutation_of_whole_blocks_shuffled_in_windows(self):
        shuffle = BlockShuffle(block_rows=10, window_blocks=3)
        order = shuffle.order(1005, np.random.default_rng([1, 2, 0]))  # 101 blocks, the last of 5 rows
        np.testing.assert_array_equal(np.sort(order), np.arange(1005))
        blocks_seen, start = [], 0
        while start < 1005:  # windows of 3 whole blocks (the last of 2), shuffled inside
            # Rows of a window never mix with the next one's: its blocks are the first 3 met.
            blocks = list(dict.fromkeys((order[start:] // 10).tolist()))[:3]
            rows = np.concatenate([np.arange(b * 10, min(b * 10 + 10, 1005)) for b in sorted(blocks)])
            np.testing.assert_array_equal(np.sort(order[start : start + len(rows)]), rows)
            assert not np.array_equal(order[start : start + len(rows)], rows)
            blocks_seen.extend(blocks)
            start += len(rows)
        assert sorted(blocks_seen) == list(range(101)) and blocks_seen != sorted(blocks_seen)
        np.testing.assert_array_equal(order, shuffle.order(1005, np.random.default_rng([1, 2, 0])))
        assert not np.array_equal(order, shuffle.order(1005, np.random.default_rng([1, 2, 1])))

    def test_a_chunk_of_one_window_reads_its_blocks_in_as_many_slices(self):
        plan = FitPlan.create(100_000, 1000, drop_last=False, max_epochs=1, max_steps=None, steps_per_chunk=4)
        shuffled = ChunkSource(
            plan, seed=[3], shuffle=BlockShuffle(block_rows=1000, window_blocks=4), process_index=0, process_count=1
        )
        exact = ChunkSource(plan, seed=[3], shuffle=True, process_index=0, process_count=1)
        values = np.arange(100_000, dtype=np.float32)
        for chunk in range(3):
            source = CountingRows(values)
            record = shuffled[chunk]
            np.testing.assert_array_equal(read_rows(source, record["indices"]), values[record["indices"]])
            assert len(source.reads) <= 4 and source.rows_read().sum() == 4000
        source = CountingRows(values)
        read_rows(source, exact[0]["indices"])
        assert len(source.reads) > 1000  # the exact permutation: mostly single rows

    def test_a_fit_with_a_block_shuffle_from_zarr_equals_the_fit_from_numpy(self, tmp_path):
        shuffle = BlockShuffle(block_rows=100, window_blocks=5)
        reference = fit(DATA, data_placement="host", shuffle=shuffle)
        result = fit(write_zarr(tmp_path, 2), shuffle=shuffle)
        assert_bitwise_equal(result, reference)

    @pytest.mark.parametrize("bad", [{"block_rows": 0}, {"window_blocks": 2.5}, {"block_rows": True}])
    def test_sizes_must_be_positive_ints(self, bad):
        name, value = next(iter(bad.items()))
        with pytest.raises(ConfigurationError, match=rf"BlockShuffle's {name} must be a positive int; got {value!r}"):
            BlockShuffle(**bad)


def test_a_prediction_from_a_source_equals_the_one_from_numpy_reading_batch_by_batch(tmp_path):
    from .test_predictor import dyadic_x, linear_predictor, values

    predictor = linear_predictor()
    try:
        x = dyadic_x(3000)
        reference = predictor.predict({"x": x}, batch_size=512)
        source = CountingRows(x)
        tree = predictor.predict({"x": source}, batch_size=512)
        for site in reference["posterior_predictive"].data_vars:
            np.testing.assert_array_equal(
                values(tree, "posterior_predictive", site), values(reference, "posterior_predictive", site)
            )
        # The NaN check's sample (read once, for the store's fingerprint too) and the rows of one key
        # block the model is traced on, twice (for the fingerprint's outputs' shapes), then the
        # batches in order: never whole.
        sampled = sample_runs(3000)
        batches = [(start, min(start + 512, 3000)) for start in range(0, 3000, 512)]
        assert source.reads == [*sampled, (0, 4), (0, 4), *batches]
    finally:
        predictor.cleanup()


def zarr_predictor(mesh) -> Predictor:
    """The Predictor of the two-process test: batches of 960 rows are 8 key blocks of 120."""
    posterior = {"w": np.linspace(1.0, 2.0, 6, dtype=np.float32), "b": np.linspace(-0.5, 0.5, 6, dtype=np.float32)}
    return Predictor(linear_model(4800), posterior, mesh=mesh, rng_key=jax.random.key(3), rows_per_key=120)


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_reading_one_store_each_read_their_half_of_every_batch(tmp_path):
    from .test_distributed import finish, start

    data = linear_data(4800)
    for name, values in data.items():
        zarr.create_array(tmp_path / f"{name}.zarr", shape=values.shape, chunks=(500,), dtype=values.dtype)[:] = values
    results = finish(start("zarr", tmp_path, 2, 2))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    first, second = (result for _, result, _ in results)
    assert first["placement"] == second["placement"] == "host"
    assert first["losses"] == second["losses"] and len(first["losses"]) == 20
    trainer = Trainer(max_epochs=2, rng_key=jax.random.key(0), enable_progress_bar=False)
    reference = trainer.fit(linear_svi(4800), data, batch_size=480, data_placement="host")
    np.testing.assert_allclose(first["losses"], reference.losses, rtol=1e-6)
    sample = np.zeros(4800, np.int64)
    sample[sample_indices(4800)] = 1
    for name in ("x", "y"):
        reads = [np.asarray(result["rows_read"][name]) for result in (first, second)]
        # Each process: the sample once (for the NaN check and the processes' agreement on the
        # data), and its 240 columns of the leading batch and of every batch: 2 x 2,400 rows in 2 epochs.
        for read in reads:
            assert read.sum() == sample.sum() + 240 + 2 * 2400
        # Together, every row once an epoch: the processes' shares do not overlap.
        leading = np.zeros(4800, np.int64)
        leading[:480] = 1
        np.testing.assert_array_equal(reads[0] + reads[1] - 2 * sample - leading, np.full(4800, 2))
    # The prediction: each process reads its 480 rows of every 960-row batch (after the checks'
    # sample and the key block the model is traced on), and the store equals a one-process prediction.
    assert first["store"] == second["store"]
    for process, result in enumerate((first, second)):
        for name in ("x", "y"):
            batches = [[start + 480 * process, start + 480 * (process + 1)] for start in range(0, 4800, 960)]
            # The checks' sample, then the first key block (for tracing the model), then the batches.
            reads = result["prediction_reads"][name]
            sampled, rest = reads[: reads.index([0, 120])], reads[reads.index([0, 120]) :]
            assert sorted(row for a, b in sampled for row in range(a, b)) == sample_indices(4800).tolist()
            assert [read for read in rest if read != [0, 120]] == batches, (process, name)
    predictor = zarr_predictor(make_mesh(1))
    try:
        reference = predictor.predict(data, batch_size=960)
        tree = open_store(first["store"])
        for group, site in [("posterior_predictive", "y"), ("posterior_predictive", "mu"), ("observed_data", "y")]:
            np.testing.assert_array_equal(tree[group][site].values, reference[group][site].values, strict=True)
    finally:
        predictor.cleanup()


def test_a_prediction_writes_the_observed_values_of_a_source_batch_by_batch_and_checks_its_rows(tmp_path):
    from .test_predictor import dyadic_x, linear_predictor

    predictor = linear_predictor()
    try:
        x, y = dyadic_x(3000), np.linspace(-1.0, 1.0, 3000).astype(np.float32)
        source = CountingRows(y)
        tree = predictor.predict({"x": x, "y": source}, batch_size=512)
        np.testing.assert_array_equal(tree["observed_data"]["y"].values, y, strict=True)
        sampled = sample_runs(3000)
        # The NaN check's sample, the key block the model is traced on, then the batches: never whole.
        batches = [(start, min(start + 512, 3000)) for start in range(0, 3000, 512)]
        assert source.reads == [*sampled, (0, 4), *batches]
        bad = y.copy()
        bad[100] = np.nan  # outside the sample: found as its batch is read
        assert 100 not in sample_indices(3000)
        with pytest.raises(DataError, match=r"the lazy source 'x' holds nan at row 100 .* predictions would be NaN"):
            predictor.predict({"x": CountingRows(np.where(np.isnan(bad), np.nan, x))}, batch_size=512)
    finally:
        predictor.cleanup()


class CountingRecords:
    """A Grain random-access source of records (``{"x": ..., "y": ...}``, decoded from ArrayRecord
    bytes) that counts how often each record is read."""

    def __init__(self, path: Path, num_rows: int) -> None:
        import grain

        self.records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([str(path)])).map(decode_record)
        self.counts = np.zeros(num_rows, np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, row: int) -> dict:
        self.counts[row] += 1
        return self.records[row]


def decode_record(record: bytes) -> dict:
    values = np.frombuffer(record, np.float32)
    return {"x": values[0], "y": values[1]}


def write_records(path: Path, data: dict[str, np.ndarray]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:64")
    for x, y in zip(data["x"], data["y"], strict=True):
        writer.write(np.array([x, y], np.float32).tobytes())
    writer.close()


class TestRecords:
    def test_a_fit_from_array_record_files_equals_the_fit_from_numpy_reading_each_record_once_a_read(
        self, in_memory, tmp_path
    ):
        write_records(tmp_path / "data.array_record", DATA)
        records = CountingRecords(tmp_path / "data.array_record", NUM_ROWS)
        assert_bitwise_equal(fit(records), in_memory)
        # Both columns from one read of each record: every row once an epoch, plus the sample of the
        # NaN check and the leading batch (its 256 rows), never once per column.
        expected = np.full(NUM_ROWS, MAX_EPOCHS)
        expected[sample_indices(NUM_ROWS)] += 1
        expected[:BATCH_SIZE] += 1
        expected[0] += 1  # record 0, read first to learn the columns
        np.testing.assert_array_equal(records.counts, expected)

    def test_a_prediction_from_records_equals_the_one_from_numpy(self, tmp_path):
        from .test_predictor import linear_predictor, values

        data = linear_data(1000)
        write_records(tmp_path / "data.array_record", data)
        predictor = linear_predictor()
        try:
            reference = predictor.predict(data, batch_size=256)
            tree = predictor.predict(CountingRecords(tmp_path / "data.array_record", 1000), batch_size=256)
            np.testing.assert_array_equal(tree["observed_data"]["y"].values, data["y"], strict=True)
            np.testing.assert_array_equal(
                values(tree, "posterior_predictive", "y"), values(reference, "posterior_predictive", "y")
            )
        finally:
            predictor.cleanup()

    def test_records_that_are_not_mappings_or_change_shape_are_refused(self):
        with pytest.raises(
            DataError, match=r"or a random-access source of records .* record 0 of the list given is list"
        ):
            validate_data([[1.0, 2.0]])
        columns = record_columns([{"x": np.zeros(2)}, {"x": np.zeros(3)}])
        with pytest.raises(DataError, match=r"hold 'x' as an array of shape \(2,\) like record 0"):
            read_rows(columns["x"], np.array([0, 1]))


@pytest.mark.slow
def test_a_fit_from_zarr_killed_mid_epoch_resumes_bitwise(tmp_path):
    from .checkpoint_worker import NUM_ROWS as WORKER_ROWS
    from .test_checkpoint import load_npz, start_worker, wait_all

    data = linear_data(WORKER_ROWS)
    for name, values in data.items():
        zarr.create_array(tmp_path / f"{name}.zarr", shape=values.shape, chunks=(128,), dtype=values.dtype)[:] = values
    store = ["--zarr", tmp_path]
    first = wait_all({
        "reference": start_worker(1, "--dirpath", tmp_path / "reference", "--out", tmp_path / "reference.npz", *store),
        "killed": start_worker(1, "--dirpath", tmp_path / "killed", "--kill-step", 14, *store),
    })  # fmt: skip
    assert first["reference"][0] == 0, first["reference"][1]
    assert first["killed"][0] == -signal.SIGKILL, first["killed"][1]
    second = wait_all(
        {
            "resumed": start_worker(
                1, "--dirpath", tmp_path / "killed", "--resume", "--out", tmp_path / "resumed.npz", *store
            )
        }
    )
    assert second["resumed"][0] == 0, second["resumed"][1]
    reference, resumed = load_npz(tmp_path / "reference.npz"), load_npz(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(resumed.losses, reference.losses, strict=True)
    for name, value in reference.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name, strict=True)


def test_an_impact_model_fits_and_predicts_from_sources_as_from_numpy():
    from .aimz_api.conftest import data as causal_data
    from .aimz_api.conftest import new_model

    X, t, y = causal_data()
    reference = new_model().fit(X, y, t=t, num_samples=10, batch_size=200, epochs=2, progress=False)
    sources = {name: CountingRows(values) for name, values in {"X": X, "t": t, "y": y}.items()}
    model = new_model().fit(
        sources["X"], sources["y"], t=sources["t"], num_samples=10, batch_size=200, epochs=2, progress=False
    )
    try:
        np.testing.assert_array_equal(np.asarray(model.vi_result.losses), np.asarray(reference.vi_result.losses))
        assert sources["X"].reads  # read by rows, not converted whole by np.asarray
        expected = reference.predict(X[:500], t=t[:500], batch_size=100, progress=False)
        got = model.predict(CountingRows(X[:500]), t=CountingRows(t[:500]), batch_size=100, progress=False)
        for site in expected["posterior_predictive"].data_vars:
            np.testing.assert_array_equal(
                got["posterior_predictive"][site].values, expected["posterior_predictive"][site].values
            )
    finally:
        reference.cleanup()
        model.cleanup()
