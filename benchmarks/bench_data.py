"""Data benchmark: a fit from a Zarr v3 store on disk against the same fit from NumPy in memory.

Setting: ``--rows`` x ``--cols`` float32 features (default 20,000,000 x 100, 8 GB: pass a
smaller ``--rows`` on a small disk) and a float32 target, written once to a Zarr v3 store in
``--dir`` (a temporary directory by default, removed at the end) in chunks of ``--chunk-rows``
rows; a Bayesian linear regression (``w ~ Normal(0, 1)^cols``, ``y ~ Normal(X w + b, 1)`` in a
subsampled plate), AutoNormal, Adam, batches of ``--batch`` rows, ``--steps`` steps.

The runs, each one JSON line on stdout:

- **memory**: ``fit`` from the NumPy arrays (``data_placement="host"``: the same batches,
  gathered from memory, the losses bitwise those of the Zarr runs).
- **zarr_rows**: from the store, ``shuffle=True`` (an exact permutation: a batch is a scatter
  of single rows across the store).
- **zarr_blocks**: from the store, ``shuffle=BlockShuffle(block_rows=chunk_rows,
  window_blocks=16)``: a chunk of steps reads a few whole Zarr chunks.

Figures per run: ``steady_steps_per_s`` (steps after the first compiled chunk over the time
they took, so compilation is left out), ``fit_s`` (the ``fit`` call), ``rows_read`` and
``bytes_read`` (rows the fit read from the source, counted by a wrapper; for the memory run, the
rows gathered), and ``losses_equal_memory`` for the Zarr runs with the memory run's shuffle.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_data.py --rows 200000 --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import zarr
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import BlockShuffle, Callback, Trainer


class ChunkTimes(Callback):
    """The time and step of every finished chunk."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, int]] = []

    def on_train_chunk_end(self, trainer: Any, progress: Any, losses: Any, steps: Any) -> None:
        self.ends.append((time.perf_counter(), progress.step))


class CountedRows:
    """A lazy source over ``source`` that counts the rows and bytes read."""

    def __init__(self, source: Any) -> None:
        self.source, self.shape, self.dtype = source, tuple(source.shape), np.dtype(source.dtype)
        self.chunks = source.chunks  # read as the store itself is: once per storage chunk touched
        self.rows = 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        values = np.asarray(self.source[rows])
        self.rows += len(values)
        return values


def model_for(num_rows: int, num_cols: int) -> Any:
    def model(X: Any, y: Any = None) -> None:
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([num_cols]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", num_rows, subsample_size=X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ w + b, 1.0), obs=y)

    return model


def write_store(directory: Path, rows: int, cols: int, chunk_rows: int, seed: int) -> dict[str, zarr.Array]:
    """The features and targets, written slab by slab (never all in memory at once)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=cols).astype(np.float32) / np.sqrt(cols)
    X = zarr.create_array(directory / "X.zarr", shape=(rows, cols), chunks=(chunk_rows, cols), dtype=np.float32)
    y = zarr.create_array(directory / "y.zarr", shape=(rows,), chunks=(chunk_rows,), dtype=np.float32)
    slab = max(chunk_rows, (64 << 20) // (4 * cols) // chunk_rows * chunk_rows)  # about 64 MB a slab
    for start in range(0, rows, slab):
        stop = min(start + slab, rows)
        features = rng.normal(size=(stop - start, cols)).astype(np.float32)
        X[start:stop] = features
        y[start:stop] = features @ w + 0.5 + rng.normal(size=stop - start).astype(np.float32)
    return {"X": zarr.open_array(directory / "X.zarr", mode="r"), "y": zarr.open_array(directory / "y.zarr", mode="r")}


def run(name: str, data: dict[str, Any], args: argparse.Namespace, **fit_kwargs: Any) -> dict[str, Any]:
    times = ChunkTimes()
    trainer = Trainer(max_steps=args.steps, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=[times])
    model = model_for(args.rows, args.cols)
    svi = SVI(model, AutoNormal(model), adam(1e-3), Trace_ELBO())
    started = time.perf_counter()
    result = trainer.fit(svi, data, batch_size=args.batch, **fit_kwargs)
    fit_s = time.perf_counter() - started
    (first_time, first_step), (last_time, last_step) = times.ends[0], times.ends[-1]
    steady = (last_step - first_step) / (last_time - first_time) if last_step > first_step else None
    counted = [source for source in data.values() if isinstance(source, CountedRows)]
    bytes_read = sum(source.rows * math.prod(source.shape[1:]) * source.dtype.itemsize for source in counted)
    return {
        "run": name,
        "rows": args.rows,
        "cols": args.cols,
        "batch": args.batch,
        "steps": int(result.losses.shape[0]),
        "placement": trainer.placement,
        "steady_steps_per_s": steady,
        "fit_s": fit_s,
        "rows_read": counted[0].rows if counted else None,  # of X (y: the same rows)
        "bytes_read": bytes_read if counted else None,
        "losses": result.losses,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        print(f"writing {args.rows} x {args.cols} rows to {directory}", file=sys.stderr)
        store = write_store(directory, args.rows, args.cols, args.chunk_rows, args.seed)
        memory = {name: array[:] for name, array in store.items()}
        blocks = BlockShuffle(block_rows=args.chunk_rows, window_blocks=16)
        reference_losses = None
        for name, data, kwargs in [
            ("memory", memory, {"data_placement": "host"}),
            ("zarr_rows", store, {}),
            ("zarr_blocks", store, {"shuffle": blocks}),
        ]:
            counted = {key: CountedRows(array) for key, array in data.items()} if name != "memory" else data
            figures = run(name, counted, args, **kwargs)
            losses = figures.pop("losses")
            if name == "memory":
                reference_losses = losses
            elif name == "zarr_rows":
                figures["losses_equal_memory"] = bool(np.array_equal(losses, reference_losses))
            print(json.dumps(figures), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
