"""Models shared by the predictor tests, and the work they run in a process of its own
(``python -m tests.predictor_worker MODE DIR``).

The device count is fixed when JAX starts, so the 1-vs-4-device test runs ``predict`` here with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; the scratch-directory tests need a
process that exits normally (``scratch-exit``) or SIGKILLs itself (``scratch-kill``);
``distributed-predict`` is one process of a ``jax.distributed`` run (``AIMZ_*`` variables) that
predicts the ``predict`` mode's data into a store shared with the other processes. Each mode
prints one JSON line on stdout.

The posterior and the inputs are dyadic rationals (k / 8, k / 4) so that ``w * x + b`` is exact in
float32 whatever XLA fuses (an FMA rounds once, a multiply-add twice: with exact products both
agree), which lets the tests compare values with ``==``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import numpy as np
import numpyro
import numpyro.distributions as dist

NOISE = 0.5
NUM_DRAWS = 6
ROWS_PER_KEY = 4


def linear_model(x, y=None):
    """y ~ Normal(w x + b, 0.5) over the plate ``obs``, with a deterministic ``mu``."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", x.shape[0]):
        mu = numpyro.deterministic("mu", w * x + b)
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def dyadic_posterior(num_draws: int = NUM_DRAWS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.integers(-16, 17, size=num_draws) / 8).astype(np.float32),
        "b": (rng.integers(-16, 17, size=num_draws) / 4).astype(np.float32),
    }


def dyadic_x(num_rows: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).integers(-32, 33, size=num_rows) / 4).astype(np.float32)


def _predict(output_dir: str) -> dict:
    import jax

    from aimz_trainer import Predictor

    predictor = Predictor(
        linear_model, dyadic_posterior(), rng_key=jax.random.key(7), rows_per_key=ROWS_PER_KEY, draws_per_chunk=4
    )
    tree = predictor.predict({"x": dyadic_x(37)}, batch_size=16, output_dir=output_dir)
    # Tiles of one block per device: each 32-row batch runs as 2 tiles of 4 x 4 rows.
    tiled = Predictor(
        linear_model, dyadic_posterior(), rng_key=jax.random.key(7), rows_per_key=ROWS_PER_KEY, draws_per_chunk=4,
        rows_per_tile=ROWS_PER_KEY,
    ).predict({"x": dyadic_x(37)}, batch_size=32, output_dir=output_dir)  # fmt: skip
    return {
        "devices": predictor.mesh.size,
        "store_path": tree.attrs["store_path"],
        "tiled_store_path": tiled.attrs["store_path"],
    }


def _predict_distributed(output_dir: str) -> dict:
    """``predict``'s first store, written by every process of the run together; also the
    refusals (``output_dir=None``, ``resume=True``), an ``output_dir`` that is not shared (one
    per process) and a store whose writer fails in process 1."""
    from aimz_trainer import distributed

    distributed.initialize()  # before anything starts JAX's backends
    import jax
    import zarr

    from aimz_trainer import ConfigurationError, DistributedError, Predictor, StoreError

    predictor = Predictor(
        linear_model, dyadic_posterior(), rng_key=jax.random.key(7), rows_per_key=ROWS_PER_KEY, draws_per_chunk=4
    )
    data = {"x": dyadic_x(37)}
    refused = {}
    for name, options in [("output_dir", {"output_dir": None}), ("resume", {"output_dir": output_dir, "resume": True})]:
        try:
            predictor.predict(data, batch_size=16, **options)
        except ConfigurationError as error:
            refused[name] = str(error)
    try:
        own = os.path.join(output_dir, f"own-{jax.process_index()}")
        predictor.predict(data, batch_size=16, output_dir=own)
    except StoreError as error:
        refused["unshared"] = str(error)
    try:  # process 1 given other rows: refused in both before any store is made
        other = data if jax.process_index() == 0 else {"x": dyadic_x(37, seed=2)}
        predictor.predict(other, batch_size=16, output_dir=os.path.join(output_dir, "mismatch"))
    except DistributedError as error:
        refused["mismatch"] = str(error)
    tree = predictor.predict(data, batch_size=16, output_dir=output_dir)

    # A disk that fills up under process 1's writer thread only.
    original = zarr.Array.__setitem__

    def setitem(self, key, value):
        if jax.process_index() == 1 and threading.current_thread().name == "aimz-store-writer":
            raise OSError(28, "No space left on device")
        return original(self, key, value)

    zarr.Array.__setitem__ = setitem
    try:
        predictor.predict(data, batch_size=16, output_dir=os.path.join(output_dir, "failed"))
        failure = None
    except Exception as error:
        failure = f"{type(error).__name__}: {error}"
    finally:
        zarr.Array.__setitem__ = original
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": predictor.mesh.size,
        "store_path": tree.attrs["store_path"],
        "refused": refused,
        "failure": failure,
    }


def main(argv: list[str]) -> None:
    mode, directory = argv
    if mode == "predict":
        print(json.dumps(_predict(directory)), flush=True)
        return
    if mode == "distributed-predict":
        print(json.dumps(_predict_distributed(directory)), flush=True)
        return
    from aimz_trainer.scratch import ScratchDirectory

    scratch = ScratchDirectory(parent=directory)
    (scratch.path / "marker.txt").write_text("x")
    print(json.dumps({"path": str(scratch.path), "pid": os.getpid()}), flush=True)
    if mode == "scratch-kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode != "scratch-exit":
        raise SystemExit(f"unknown mode {mode!r}")
    # scratch-exit: a normal exit; the directory is removed at interpreter exit.


if __name__ == "__main__":
    main(sys.argv[1:])
