"""Prediction stores: the writer thread, the completeness marker, resume, write failures, and the
life cycle of scratch directories (cleanup, garbage collection, interpreter exit, SIGKILL)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from aimz_trainer import ConfigurationError, Predictor, StoreError, open_store
from aimz_trainer.scratch import ScratchDirectory, sweep_scratch
from aimz_trainer.store import ArraySpec, ZarrStore
from aimz_trainer.store_reading import COMPLETE, ROWS_WRITTEN
from tests.predictor_worker import ROWS_PER_KEY, dyadic_posterior, dyadic_x, linear_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ROWS = 14  # batches of 4: 4 + 4 + 4 + 2 rows


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a prediction."""


def specs() -> list[ArraySpec]:
    return [
        ArraySpec("posterior_predictive", "y", (1, 3, 10), np.dtype(np.float32), ("chain", "draw", "obs"), 2),
        ArraySpec("posterior_predictive", "k", (1, 3, 10, 2), np.dtype(np.int8), ("chain", "draw", "obs", "k_dim"), 2),
        ArraySpec("posterior", "w", (1, 3), np.dtype(np.float64), ("chain", "draw"), None),
    ]


def full_values() -> dict[tuple[str, str], np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        ("posterior_predictive", "y"): rng.normal(size=(1, 3, 10)).astype(np.float32),
        ("posterior_predictive", "k"): rng.integers(0, 5, size=(1, 3, 10, 2)).astype(np.int8),
    }


def write_rows(store: ZarrStore, start: int, stop: int, as_jax: bool = False) -> None:
    batch = {key: value[:, :, start:stop] for key, value in full_values().items()}
    if as_jax:
        batch = {key: jnp.asarray(value) for key, value in batch.items()}
    store.write_batch(start, stop, batch)


# -- ZarrStore ------------------------------------------------------------------------------------


def test_zarr_store_writes_batches_from_its_thread(tmp_path):
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4, attrs={"note": "hello"}, max_pending=1)
    assert store.rows_written == 0
    assert zarr.open_group(path, mode="r").attrs[COMPLETE] is False
    writer_threads = [thread for thread in threading.enumerate() if thread.name == "aimz-store-writer"]
    assert writer_threads
    store.write_whole({("posterior", "w"): np.array([[1.0, 2.0, 3.0]])})
    for start, as_jax in [(0, False), (4, True), (8, False)]:  # host and device arrays
        write_rows(store, start, min(start + 4, 10), as_jax)
    store.finalize({"finished": 1})
    assert store.rows_written == 10
    assert not store._thread.is_alive()

    tree = open_store(path)
    for (group, name), value in full_values().items():
        np.testing.assert_array_equal(tree[group][name].values, value)
        assert tree[group][name].dtype == value.dtype
    np.testing.assert_array_equal(tree["posterior"]["w"].values, [[1.0, 2.0, 3.0]])
    assert tree["posterior_predictive"]["k"].dims == ("chain", "draw", "obs", "k_dim")
    attrs = tree.attrs
    assert (attrs["note"], attrs["finished"], attrs[COMPLETE], attrs[ROWS_WRITTEN], attrs["batch_size"]) == (
        "hello",
        1,
        True,
        10,
        4,
    )
    assert zarr.open_group(path, mode="r")["posterior_predictive/y"].chunks == (1, 3, 4)


@pytest.mark.parametrize("compress_floats", [False, True])
def test_codecs_by_dtype_and_every_chunk_written(tmp_path, compress_floats):
    """Integer arrays Blosc-zstd; float arrays as they are, or Blosc-lz4 when asked; every
    block ends in a crc32c checksum of its bytes; a block equal to the fill value (all-zero
    integers) is still written: the store reads the same either way, and a block file per
    batch shows the batch was written."""
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4, compress_floats=compress_floats)
    zeros = {key: np.zeros_like(value[:, :, :4]) for key, value in full_values().items()}
    store.write_batch(0, 4, zeros)
    store.finalize()
    root = zarr.open_group(path, mode="r")
    codecs = {
        name: [
            (str(codec.cname), str(codec.shuffle)) if isinstance(codec, BloscCodec) else type(codec).__name__
            for codec in root[name].compressors
        ]
        for name in ("posterior_predictive/y", "posterior_predictive/k", "posterior/w")
    }
    floats = [("lz4", "bitshuffle"), "Crc32cCodec"] if compress_floats else ["Crc32cCodec"]
    assert codecs == {
        "posterior_predictive/y": floats,
        "posterior_predictive/k": [("zstd", "bitshuffle"), "Crc32cCodec"],
        "posterior/w": floats,
    }
    assert (path / "posterior_predictive" / "k" / "c" / "0" / "0" / "0" / "0").is_file()
    np.testing.assert_array_equal(root["posterior_predictive/k"][:, :, :4], 0)


def test_predictor_passes_compress_floats_and_checks_it(tmp_path):
    dyadic_predictor = Predictor(linear_model, dyadic_posterior(), compress_floats=True)
    tree = dyadic_predictor.predict({"x": dyadic_x(6)}, batch_size=4, output_dir=tmp_path)
    y = zarr.open_group(tree.attrs["store_path"], mode="r")["posterior_predictive/y"]
    assert [str(codec.cname) for codec in y.compressors if isinstance(codec, BloscCodec)] == ["lz4"]
    with pytest.raises(ConfigurationError, match="compress_floats must be True or False; got 'yes'"):
        Predictor(linear_model, dyadic_posterior(), compress_floats="yes")


def test_aborted_store_is_incomplete_and_can_be_resumed(tmp_path):
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4)
    store.write_whole({("posterior", "w"): np.array([[1.0, 2.0, 3.0]])})
    write_rows(store, 0, 4)
    write_rows(store, 4, 8)
    store.abort()  # waits for the queued batches, does not mark the store complete
    with pytest.raises(StoreError, match="after 8 rows") as info:
        open_store(path)
    assert "resume=True" in str(info.value)

    with pytest.raises(StoreError, match="batch_size=4"):
        ZarrStore(path, specs(), batch_size=5, resume=True)
    other = [ArraySpec("posterior_predictive", "y", (1, 3, 11), np.dtype(np.float32), ("chain", "draw", "obs"), 2)]
    with pytest.raises(StoreError, match="other arrays"):
        ZarrStore(path, other, batch_size=4, resume=True)

    resumed = ZarrStore(path, specs(), batch_size=4, resume=True)
    assert resumed.rows_written == 8
    write_rows(resumed, 8, 10)
    resumed.finalize()
    tree = open_store(path)
    for (group, name), value in full_values().items():
        np.testing.assert_array_equal(tree[group][name].values, value)
    np.testing.assert_array_equal(tree["posterior"]["w"].values, [[1.0, 2.0, 3.0]])

    with pytest.raises(StoreError, match="complete"):
        ZarrStore(path, specs(), batch_size=4, resume=True)


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a prediction store"):
        open_store(tmp_path / "missing")
    with pytest.raises(StoreError, match="not a prediction store"):
        ZarrStore(tmp_path / "missing", specs(), batch_size=4, resume=True)


def test_a_failed_write_reaches_the_caller(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4)
    error = OSError(28, "No space left on device")
    original = zarr.Array.__setitem__

    def setitem(self, key, value):
        if threading.current_thread().name == "aimz-store-writer":
            raise error
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    write_rows(store, 0, 4)
    with pytest.raises(OSError) as info:
        write_rows(store, 4, 8)  # or, at the latest, finalize()
        store.finalize()
    assert info.value is error
    store.abort()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="after 0 rows"):
        open_store(path)


def test_a_stalled_disk_sync_holds_back_the_rows_counted_not_the_writes(tmp_path, monkeypatch):
    """The block files are synced on their own thread, up to max_unsynced batches behind the
    writer: while the disk stalls, later batches are still written (the computation goes on)
    but only synced rows count, so a resume would start from rows that are on the disk."""
    disk = threading.Event()
    original_fdatasync = os.fdatasync

    def stalled_fdatasync(descriptor):
        assert disk.wait(timeout=60), "the test never released the disk"
        original_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", stalled_fdatasync)
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4, max_unsynced=2)
    for start in (0, 4, 8):
        write_rows(store, start, min(start + 4, 10))
    last_blocks = [path for key in full_values() for path in store.chunk_paths(key, 8)]
    deadline = time.monotonic() + 30
    while not all(block.is_file() for block in last_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(block.is_file() for block in last_blocks)  # every batch written past the stall
    assert store.rows_written == 0 and zarr.open_group(path, mode="r").attrs[ROWS_WRITTEN] == 0
    disk.set()
    store.finalize()
    assert store.rows_written == 10
    np.testing.assert_array_equal(
        open_store(path)["posterior_predictive"]["y"].values, full_values()[("posterior_predictive", "y")]
    )


def test_each_chunk_is_synced_to_disk_before_its_rows_count(tmp_path, monkeypatch):
    """The writer syncs every block file (then drops it from the page cache) before it records
    the rows as written; an error the disk reports only at that sync (a full disk under
    delayed allocation, EIO) fails the store like a failed write."""
    synced = []
    original_fdatasync = os.fdatasync

    def fdatasync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        original_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4)
    for start in (0, 4, 8):
        write_rows(store, start, min(start + 4, 10))
    store.finalize()
    expected = [str(path) for start in (0, 4, 8) for key in full_values() for path in store.chunk_paths(key, start)]
    assert synced == expected
    assert all(Path(file).is_file() for file in expected)
    # An uncompressed float block: 1 chain x 3 draws x 4 rows of float32 (the last one 4 rows
    # too: zarr writes whole blocks, the padding past row 10 being the fill value) and its
    # 4-byte checksum.
    [block] = store.chunk_paths(("posterior_predictive", "y"), 4)  # 48 bytes: every draw in one block
    assert block.stat().st_size == 3 * 4 * 4 + 4

    error = OSError(5, "Input/output error")

    def failing_fdatasync(descriptor):
        raise error

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    failing = ZarrStore(tmp_path / "failing", specs(), batch_size=4)
    with pytest.raises(OSError) as info:
        write_rows(failing, 0, 4)
        failing.finalize()
    assert info.value is error
    failing.abort()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="after 0 rows"):
        open_store(tmp_path / "failing")


# -- Predictor: interrupted, failed and resumed predictions ----------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(dyadic_predictor, tmp_path_factory):
    return dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path_factory.mktemp("full"))


def stores(directory: Path) -> list[Path]:
    return sorted(directory.glob("predict-*"))


def assert_same_values(tree, reference) -> None:
    for group in ("posterior_predictive", "posterior"):
        for name in reference[group].data_vars:
            np.testing.assert_array_equal(tree[group][name].values, reference[group][name].values)


def test_interrupted_prediction_resumes_to_the_same_values(dyadic_predictor, uninterrupted, tmp_path, monkeypatch):
    original = ZarrStore.write_batch
    calls = []

    def interrupt_second_batch(self, start, stop, values):
        calls.append(start)
        if len(calls) == 2:
            raise Interrupted
        return original(self, start, stop, values)

    monkeypatch.setattr(ZarrStore, "write_batch", interrupt_second_batch)
    with pytest.raises(Interrupted):
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path)
    monkeypatch.undo()
    (path,) = stores(tmp_path)
    with pytest.raises(StoreError, match="after 4 rows"):
        open_store(path)
    assert zarr.open_group(path, mode="r").attrs[ROWS_WRITTEN] == 4

    with pytest.raises(StoreError, match="batch_size=4"):
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=8, output_dir=tmp_path, resume=True)
    tree = dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)
    assert stores(tmp_path) == [path]  # continued, not rewritten elsewhere
    assert tree.attrs["store_path"] == str(path)
    assert tree.attrs[ROWS_WRITTEN] == NUM_ROWS
    assert_same_values(tree, uninterrupted)
    assert_same_values(open_store(path), uninterrupted)

    with pytest.raises(ConfigurationError, match="no interrupted store"):
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)


def test_resume_after_an_interruption_before_any_batch(dyadic_predictor, uninterrupted, tmp_path, monkeypatch):
    def interrupt(self, values):
        raise Interrupted

    monkeypatch.setattr(ZarrStore, "write_whole", interrupt)
    with pytest.raises(Interrupted):
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path)
    monkeypatch.undo()
    tree = dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)
    assert_same_values(tree, uninterrupted)


def test_writer_failure_surfaces_from_predict_and_leaves_the_store_incomplete(
    dyadic_predictor, uninterrupted, tmp_path, monkeypatch
):
    errors = []
    original = zarr.Array.__setitem__

    def setitem(self, key, value):
        if threading.current_thread().name == "aimz-store-writer":
            errors.append(OSError(28, "No space left on device"))
            raise errors[-1]
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    with pytest.raises(OSError, match="No space left") as info:
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path)
    monkeypatch.undo()
    assert info.value is errors[0]  # the writer's own exception, not a wrapper
    assert not isinstance(info.value, StoreError)
    (path,) = stores(tmp_path)
    with pytest.raises(StoreError, match="after 0 rows"):
        open_store(path)
    # Once the disk has room again the store can be completed.
    tree = dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)
    assert_same_values(tree, uninterrupted)


# -- scratch directories --------------------------------------------------------------------------


def test_scratch_directory_is_created_lazily_and_removed_by_cleanup(tmp_path):
    scratch = ScratchDirectory(parent=tmp_path)
    assert not scratch.created
    assert list(tmp_path.iterdir()) == []
    path = scratch.path
    assert scratch.created and path.is_dir() and path.parent == tmp_path
    assert path.name.startswith(f"{ScratchDirectory.PREFIX}{os.getpid()}-")
    assert scratch.path == path  # the same directory on every use
    (path / "file").write_text("x")
    scratch.cleanup()
    assert not path.exists() and not scratch.created
    scratch.cleanup()  # a no-op now
    ScratchDirectory(parent=tmp_path).cleanup()  # and when never created
    again = scratch.path  # used again: a new directory
    assert again.is_dir()
    scratch.cleanup()
    assert not again.exists()


def test_predictor_scratch_directory_life_cycle(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = {"x": dyadic_x(6)}
    posterior = dyadic_posterior()

    first = Predictor(linear_model, posterior, rows_per_key=ROWS_PER_KEY)
    assert list(tmp_path.iterdir()) == []  # nothing until a store is written
    tree = first.predict(data, batch_size=8)
    scratch = Path(tree.attrs["store_path"]).parent
    assert scratch.parent == tmp_path and scratch.name.startswith(ScratchDirectory.PREFIX)
    first.predict(data, batch_size=8, output_dir=tmp_path / "kept")
    first.cleanup()
    assert not scratch.exists()
    assert len(stores(tmp_path / "kept")) == 1  # an output_dir is never removed

    second = Predictor(linear_model, posterior, rows_per_key=ROWS_PER_KEY)
    scratch = Path(second.predict(data, batch_size=8).attrs["store_path"]).parent
    assert scratch.is_dir()
    del second
    gc.collect()
    assert not scratch.exists()


def test_tree_outlives_a_temporary_predictor(dyadic_predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = {"x": dyadic_x(6)}
    expected = dyadic_predictor.predict(data, batch_size=4)["posterior_predictive"]["mu"].values
    tree = Predictor(linear_model, dyadic_posterior(), rows_per_key=ROWS_PER_KEY).predict(data, batch_size=4)
    gc.collect()
    np.testing.assert_array_equal(tree["posterior_predictive"]["mu"].values, expected)


@pytest.fixture(scope="module")
def scratch_workers(tmp_path_factory):
    """Both scratch-directory worker processes, started together (each imports the package)."""
    started = {}
    for mode in ("scratch-exit", "scratch-kill"):
        parent = tmp_path_factory.mktemp(mode)
        command = [sys.executable, "-m", "tests.predictor_worker", mode, str(parent)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        started[mode] = (parent, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(scratch_workers, mode: str) -> tuple[Path, int, dict]:
    parent, process = scratch_workers[mode]
    stdout, _ = process.communicate(timeout=120)
    return parent, process.returncode, json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scratch_directory_is_removed_at_interpreter_exit(scratch_workers):
    tmp_path, returncode, result = finished(scratch_workers, "scratch-exit")
    assert returncode == 0
    assert Path(result["path"]).parent == tmp_path
    assert not Path(result["path"]).exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_scratch_directory_of_a_killed_process_is_swept(scratch_workers):
    tmp_path, returncode, result = finished(scratch_workers, "scratch-kill")
    assert returncode == -signal.SIGKILL
    killed = Path(result["path"])
    assert (killed / "marker.txt").is_file()  # no clean-up ran
    mine = tmp_path / f"{ScratchDirectory.PREFIX}{os.getpid()}-alive"  # a live process's: kept
    mine.mkdir()
    unrelated = tmp_path / f"{ScratchDirectory.PREFIX}not-a-pid"
    unrelated.mkdir()

    scratch = ScratchDirectory(parent=tmp_path)
    assert killed.exists()  # swept only when a directory is created
    path = scratch.path
    assert not killed.exists()
    assert mine.is_dir() and unrelated.is_dir() and path.is_dir()
    assert sweep_scratch(tmp_path) == []  # nothing dead is left
    scratch.cleanup()


def test_resume_refuses_a_store_of_another_computation(dyadic_predictor, tmp_path, monkeypatch):
    interrupted = {"batches": 0}
    original = ZarrStore.write_batch

    def interrupt_after_one(self, start, stop, values):
        if interrupted["batches"] == 1:
            raise Interrupted
        interrupted["batches"] += 1
        original(self, start, stop, values)

    monkeypatch.setattr(ZarrStore, "write_batch", interrupt_after_one)
    with pytest.raises(Interrupted):
        dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path)
    monkeypatch.undo()
    other = Predictor(linear_model, dyadic_posterior(), rows_per_key=ROWS_PER_KEY, rng_key=jax.random.key(99))
    with pytest.raises(StoreError, match="another computation"):
        other.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)
    with pytest.raises(StoreError, match="another computation"):
        dyadic_predictor.predict(
            {
                "x": dyadic_x(NUM_ROWS) + 1,
            },
            batch_size=4,
            output_dir=tmp_path,
            resume=True,
        )
    tree = dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=4, output_dir=tmp_path, resume=True)
    assert tree.attrs["aimz_trainer_complete"]
