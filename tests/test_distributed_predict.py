"""Prediction in a multi-process run (``jax.distributed`` over loopback, 2 processes x 2 CPU
devices): one shared store whose values equal a single-process prediction's, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import zarr

from aimz_trainer import Predictor, StoreError, make_mesh, open_store
from aimz_trainer.distributed import free_port
from aimz_trainer.store import ArraySpec, ZarrStore
from aimz_trainer.store_reading import ROWS_WRITTEN
from tests.predictor_worker import NUM_DRAWS, ROWS_PER_KEY, dyadic_posterior, dyadic_x, linear_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2


def run_processes(directory: str, timeout_s: float = 120) -> list[dict]:
    """``tests.predictor_worker distributed-predict`` as the processes of one run; their JSON."""
    address = f"127.0.0.1:{free_port()}"
    children = []
    for rank in range(PROCESSES):
        env = {
            **os.environ,
            "AIMZ_COORDINATOR_ADDRESS": address,
            "AIMZ_NUM_PROCESSES": str(PROCESSES),
            "AIMZ_PROCESS_ID": str(rank),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "PYTHONHASHSEED": "0",  # one hash seed in every process, as distributed.initialize requires
        }
        command = [sys.executable, "-m", "tests.predictor_worker", "distributed-predict", directory]
        children.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = []
    try:
        for child in children:
            outputs.append(child.communicate(timeout=timeout_s))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for rank, (child, (_, stderr)) in enumerate(zip(children, outputs, strict=True)):
        assert child.returncode == 0, f"process {rank}: {stderr[-3000:]}"
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


@pytest.mark.slow
@pytest.mark.multidevice
def test_processes_write_one_store_equal_to_a_single_process_prediction(tmp_path):
    results = run_processes(str(tmp_path / "shared"))
    assert [r["process"] for r in results] == [0, 1]
    assert {(r["processes"], r["devices"]) for r in results} == {(PROCESSES, 4)}
    assert results[0]["store_path"] == results[1]["store_path"]
    path = results[0]["store_path"]

    shared = open_store(path)  # complete, else StoreError
    assert shared.attrs["batch_size"] == 16 and shared.attrs["writers"] == PROCESSES
    assert shared.attrs["aimz_trainer_rows_written"] == 37
    root = zarr.open_group(path, mode="r")
    for site in ("y", "mu"):
        assert root[f"posterior_predictive/{site}"].shape == (1, NUM_DRAWS, 37)
        assert root[f"posterior_predictive/{site}"].chunks == (1, NUM_DRAWS, 8)  # one block per process and batch
    assert root["posterior/w"].chunks == (1, NUM_DRAWS)

    predictor = Predictor(
        linear_model,
        dyadic_posterior(),
        mesh=make_mesh(1),
        rng_key=jax.random.key(7),
        rows_per_key=ROWS_PER_KEY,
        draws_per_chunk=4,
    )
    single = predictor.predict({"x": dyadic_x(37)}, batch_size=16, output_dir=tmp_path / "single")
    assert sorted(shared.children) == sorted(single.children) == ["posterior", "posterior_predictive"]
    for group, names in [("posterior_predictive", ("y", "mu")), ("posterior", ("w", "b"))]:
        for name in names:
            assert shared[group][name].dims == single[group][name].dims
            np.testing.assert_array_equal(shared[group][name].values, single[group][name].values)

    # Refused before any batch ran, with the argument to change named.
    for refused in results:
        assert "output_dir" in refused["refused"]["output_dir"]
        assert "resume=True" in refused["refused"]["resume"]
    assert "shared file system" in results[0]["refused"]["unshared"]
    assert "writer 0 has not created" in results[1]["refused"]["unshared"]
    for refused in results:
        assert "given different data, posterior, keys or settings to predict" in refused["refused"]["mismatch"]
        assert "process 1: {'batch_size': 16, 'computation'" in refused["refused"]["mismatch"]
    assert not (tmp_path / "shared" / "mismatch").exists()

    # Process 1's writer failed: both processes raised, and the store is not complete.
    assert results[1]["failure"].startswith("OSError")
    assert results[0]["failure"].startswith("StoreError") and "[1]" in results[0]["failure"]
    (failed,) = (tmp_path / "shared" / "failed").glob("predict-*")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(failed)
    predictor.cleanup()


def test_writers_share_a_store_one_chunk_each(tmp_path):
    """The store side, in one process: writer 0 creates, writer 1 joins; each batch of 8 rows is
    two 4-row blocks; only writer 0 finalizes, and rows written are recorded then."""
    spec = ArraySpec("posterior_predictive", "y", (1, 2, 14), np.dtype(np.float32), ("chain", "draw", "obs"), 2)
    values = np.arange(28, dtype=np.float32).reshape(1, 2, 14)
    path = tmp_path / "store"
    first = ZarrStore(path, [spec], batch_size=8, writers=2)
    second = ZarrStore(path, [spec], batch_size=8, writers=2, join=True)
    assert zarr.open_group(path, mode="r")["posterior_predictive/y"].chunks == (1, 2, 4)
    for start in (0, 8):  # the second batch: writer 0 rows 8..12, writer 1 rows 12..14
        for writer, store in enumerate((first, second)):
            begin, end = start + 4 * writer, min(start + 4 * writer + 4, 14)
            store.write_batch(begin, end, {("posterior_predictive", "y"): values[:, :, begin:end]})
    second.flush()
    first.flush()
    with pytest.raises(StoreError, match="processes"):
        open_store(path)  # not finalized yet
    with pytest.raises(StoreError, match="writer 0"):
        second.finalize()
    with pytest.raises(StoreError, match="2 processes"):
        ZarrStore(path, [spec], batch_size=8, resume=True)
    first.finalize()
    tree = open_store(path)
    assert tree.attrs[ROWS_WRITTEN] == 14 and tree.attrs["writers"] == 2
    np.testing.assert_array_equal(tree["posterior_predictive"]["y"].values, values)
    with pytest.raises(StoreError, match="dividing batch_size"):
        ZarrStore(tmp_path / "other", [spec], batch_size=8, writers=3)
