"""No fill value stands in for written data (issue 16, items 3 and 4).

A store's block (a Zarr chunk) that is gone (the store removed by ``cleanup()`` or by another
process, one file deleted) or damaged (a flipped byte) raises ``StoreError`` when read, is named
by ``verify_store`` and is recomputed by a resume; the scratch sweep removes a directory only when
its owner's lock is free, whatever PID the owner has in our namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import ImpactModel, Predictor, StoreError, StoreWarning, open_store
from aimz_trainer.scratch import ScratchDirectory, sweep_scratch
from aimz_trainer.store import ArraySpec, ZarrStore
from aimz_trainer.store_reading import verify_store
from tests.predictor_worker import dyadic_x

NUM_ROWS, BATCH = 14, 4  # batches of rows 0-4, 4-8, 8-12, 12-14


class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of a prediction."""


# -- a tree read after its store was removed ------------------------------------------------------


def scratch_values(dyadic_predictor: Predictor) -> tuple[xr.DataArray, Path]:
    """Values not yet read from a store in the dyadic_predictor's scratch directory, and the store."""
    tree = dyadic_predictor.predict({"x": dyadic_x(6)}, batch_size=4)
    return tree["posterior_predictive"]["y"], Path(tree.attrs["store_path"])


def test_a_predictor_tree_read_after_cleanup_raises_instead_of_reading_fill_values(dyadic_predictor):
    values, store = scratch_values(dyadic_predictor)
    dyadic_predictor.cleanup()
    with pytest.raises(StoreError, match=r"no longer exists.*cleanup\(\)") as info:
        values.values  # noqa: B018 (the lazy read is the point; before: NaN)
    assert str(store) in str(info.value)


def bernoulli_kernel(X, y=None):
    w = numpyro.sample("w", dist.Normal())
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=w * X), obs=y)


def test_an_impact_model_tree_read_after_cleanup_raises_instead_of_reading_fill_values():
    """Bernoulli draws: the fill value, 0, would read as an outcome."""
    svi = SVI(bernoulli_kernel, AutoNormal(bernoulli_kernel), adam(0.05), Trace_ELBO())
    model = ImpactModel(bernoulli_kernel, rng_key=jax.random.key(0), inference=svi)
    tree = model.sample_prior_predictive(dyadic_x(6), num_samples=5, batch_size=4, progress=False)
    model.cleanup()
    with pytest.raises(StoreError, match=r"no longer exists.*cleanup\(\)") as info:
        tree["prior_predictive"]["y"].values  # noqa: B018 (before: 0s)
    assert tree.attrs["store_path"] in str(info.value)


def test_a_tree_read_after_another_process_removed_the_scratch_directory_raises(dyadic_predictor):
    """As an older version's sweep (which took an owner in another PID namespace for dead), or
    a clean-up of /tmp, would."""
    values, store = scratch_values(dyadic_predictor)
    command = [sys.executable, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1])", str(store.parent)]
    subprocess.run(command, check=True)
    with pytest.raises(StoreError, match="no longer exists") as info:
        values.values  # noqa: B018
    assert str(store) in str(info.value)


# -- a missing or damaged block of a complete store ------------------------------------------------


def specs() -> list[ArraySpec]:
    return [
        ArraySpec("posterior_predictive", "y", (1, 3, 10), np.dtype(np.float32), ("chain", "draw", "obs"), 2),
        ArraySpec("posterior_predictive", "k", (1, 3, 10), np.dtype(np.int8), ("chain", "draw", "obs"), 2),
        ArraySpec("posterior", "w", (1, 3), np.dtype(np.float64), ("chain", "draw"), None),
    ]


def complete_store(path: Path) -> ZarrStore:
    rng = np.random.default_rng(0)
    rows = {
        ("posterior_predictive", "y"): rng.normal(size=(1, 3, 10)).astype(np.float32),
        ("posterior_predictive", "k"): np.ones((1, 3, 10), np.int8),  # never the fill value
    }
    store = ZarrStore(path, specs(), batch_size=4)
    store.write_whole({("posterior", "w"): np.array([[1.0, 2.0, 3.0]])})
    for start in (0, 4, 8):
        store.write_batch(
            start, min(start + 4, 10), {key: value[..., start : start + 4] for key, value in rows.items()}
        )
    store.finalize()
    return store


def flip_a_byte(block: Path, offset: int = 5) -> None:
    data = bytearray(block.read_bytes())
    data[offset] ^= 0x01
    block.write_bytes(bytes(data))


def test_a_chunk_deleted_from_a_complete_store_raises_when_read_and_in_verify_store(tmp_path):
    store = complete_store(tmp_path / "store")
    block = store.chunk_paths(("posterior_predictive", "k"), 4)[0]
    block.unlink()
    tree = open_store(store.path)
    k = tree["posterior_predictive"]["k"]
    np.testing.assert_array_equal(k[..., :4].values, 1)  # the blocks still there read as before
    with pytest.raises(StoreError, match=r"posterior_predictive/k/c/0/0/1' \(missing\).*deleted") as info:
        k.values  # noqa: B018 (before: 0s, a Bernoulli outcome, in rows 4-8)
    assert str(store.path) in str(info.value)
    with pytest.raises(StoreError, match=r"1 chunk\(s\) missing or damaged: 'posterior_predictive/k/c/0/0/1'"):
        verify_store(store.path)


def test_a_flipped_byte_in_a_float_chunk_raises_when_read_and_in_verify_store(tmp_path):
    store = complete_store(tmp_path / "store")
    flip_a_byte(store.chunk_paths(("posterior_predictive", "y"), 8)[0])
    y = open_store(store.path)["posterior_predictive"]["y"]
    with pytest.raises(StoreError, match=r"'posterior_predictive/y/c/0/0/2' \(damaged\).*crc32c checksum"):
        y.values  # noqa: B018 (before: a slightly different float, silently)
    with pytest.raises(StoreError, match=r"posterior_predictive/y/c/0/0/2' \(damaged\)"):
        verify_store(store.path)


def test_verify_store_names_every_bad_chunk_and_refuses_what_it_cannot_check(tmp_path):
    store = complete_store(tmp_path / "store")
    assert verify_store(store.path) == 3 + 3 + 1  # the blocks of y, k and w
    store.chunk_paths(("posterior_predictive", "y"), 0)[0].unlink()
    flip_a_byte(store.chunk_paths(("posterior_predictive", "k"), 8)[0], offset=-1)  # the checksum itself
    (store.path / "posterior" / "w" / "c" / "0" / "0").unlink()  # an array written whole
    with pytest.raises(StoreError, match="3 chunk") as info:
        verify_store(store.path)
    for named in ("y/c/0/0/0' (missing)", "k/c/0/0/2' (damaged)", "posterior/w/c/0/0' (missing)"):
        assert named in str(info.value)
    with pytest.raises(StoreError, match="not a prediction store"):
        verify_store(tmp_path / "nothing")
    incomplete = ZarrStore(tmp_path / "incomplete", specs(), batch_size=4)
    incomplete.abort()
    with pytest.raises(StoreError, match="incomplete"):
        verify_store(incomplete.path)


# -- resume reads back what it continues -----------------------------------------------------------


def interrupted_after(dyadic_predictor: Predictor, batches: int, output_dir: Path, monkeypatch) -> Path:
    original, calls = ZarrStore.write_batch, []

    def write_batch(self, start, stop, values):
        calls.append(start)
        if len(calls) > batches:
            raise Interrupted
        original(self, start, stop, values)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrStore, "write_batch", write_batch)
        with pytest.raises(Interrupted):
            dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=BATCH, output_dir=output_dir)
    (path,) = output_dir.glob("predict-*")
    return path


@pytest.mark.parametrize("harm", ["deleted", "flipped byte"])
def test_resume_recomputes_from_an_earlier_chunk_that_is_not_intact(dyadic_predictor, harm, tmp_path, monkeypatch):
    reference = dyadic_predictor.predict({"x": dyadic_x(NUM_ROWS)}, batch_size=BATCH, output_dir=tmp_path / "reference")
    path = interrupted_after(dyadic_predictor, 3, tmp_path / "interrupted", monkeypatch)
    block = path / "posterior_predictive" / "y" / "c" / "0" / "0" / "1"  # rows 4-8, recorded as written
    if harm == "deleted":
        block.unlink()
    else:
        flip_a_byte(block)
    with pytest.warns(StoreWarning, match=r"'posterior_predictive/y/c/0/0/1'.*rows from 4 on are computed again"):
        tree = dyadic_predictor.predict(
            {"x": dyadic_x(NUM_ROWS)}, batch_size=BATCH, output_dir=path.parent, resume=True
        )
    for name in ("y", "mu"):
        np.testing.assert_array_equal(
            tree["posterior_predictive"][name].values, reference["posterior_predictive"][name].values
        )
    assert verify_store(path) > 0


def test_resume_reads_back_every_row_wise_array_and_warns_only_when_it_rewinds(tmp_path, recwarn):
    path = tmp_path / "store"
    store = ZarrStore(path, specs(), batch_size=4)
    store.write_batch(0, 4, {("posterior_predictive", "y"): np.ones((1, 3, 4), np.float32)})
    store.write_batch(4, 8, {("posterior_predictive", "y"): np.ones((1, 3, 4), np.float32)})
    store.abort()  # "k" was never written: its blocks of rows 0-8 are missing
    resumed = ZarrStore(path, specs()[:1] + specs()[2:], batch_size=4, resume=True)
    assert resumed.rows_written == 8 and not recwarn.list
    resumed.abort()
    with pytest.warns(StoreWarning, match="rows from 0 on"):
        assert ZarrStore(path, specs(), batch_size=4, resume=True).rows_written == 0


def test_a_store_killed_while_its_arrays_were_created_is_created_anew_on_resume(tmp_path):
    path = tmp_path / "store"
    ZarrStore(path, specs(), batch_size=4).abort()
    shutil.rmtree(path / "posterior_predictive" / "k")  # the kill came before this array was made
    resumed = ZarrStore(path, specs(), batch_size=4, resume=True)
    assert resumed.rows_written == 0
    resumed.write_batch(0, 4, {("posterior_predictive", "k"): np.ones((1, 3, 4), np.int8)})
    resumed.abort()
    assert (path / "posterior_predictive" / "k" / "zarr.json").exists()


# -- the scratch sweep ----------------------------------------------------------------------------


def absent_pid() -> int:
    """A PID no process has in our namespace (above the kernel's largest), as an owner in
    another PID namespace (a container sharing /tmp) looks from here."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


HOLD_LOCK = """
import fcntl, os, sys
lock = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # held until the test closes our stdin
"""

TRY_LOCK = """
import fcntl, os, sys
try:
    fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
"""


def test_a_live_owner_whose_pid_we_cannot_see_keeps_its_directory_and_a_dead_one_is_swept(tmp_path):
    other = tmp_path / f"{ScratchDirectory.PREFIX}{absent_pid()}-elsewhere"
    other.mkdir()
    (other / "predict-1").mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(other / ScratchDirectory.LOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "locked"
        assert sweep_scratch(tmp_path) == []
        mine = ScratchDirectory(parent=tmp_path)
        assert mine.path.is_dir()  # creating one sweeps too
        assert (other / "predict-1").is_dir()
    finally:
        owner.communicate("")  # the owner exits: the kernel releases its lock
    assert sweep_scratch(tmp_path) == [other]
    assert not other.exists()
    assert mine.path.is_dir()  # our own is kept
    mine.cleanup()


def test_a_directory_without_a_lock_file_is_kept(tmp_path):
    """Made by a version before the locks: nothing tells whether its owner lives."""
    older = tmp_path / f"{ScratchDirectory.PREFIX}{absent_pid()}-older"
    older.mkdir()
    assert sweep_scratch(tmp_path) == []
    assert older.is_dir()


def test_a_scratch_directory_holds_its_lock_until_cleanup(tmp_path):
    scratch = ScratchDirectory(parent=tmp_path)
    lock = scratch.path / ScratchDirectory.LOCK
    assert lock.is_file() and [entry.name for entry in scratch.path.iterdir()] == [ScratchDirectory.LOCK]
    probe = subprocess.run([sys.executable, "-c", TRY_LOCK, str(lock)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "held"  # by this process, seen from another
    scratch.cleanup()
    assert not lock.exists()
