"""Data benchmark: fits and predictions from a Zarr v3 store on disk against the same from memory.

Setting: ``--rows`` x ``--cols`` float32 features (default 20,000,000 x 100, 8 GB: pass a
smaller ``--rows`` on a small disk) and int32 Bernoulli labels, written once to a Zarr v3
store in ``--dir`` (a temporary directory by default, removed at the end) in chunks of
``--chunk-rows`` rows, the features uncompressed (random floats do not compress). The model
is the reference network (``recipes/bnn_binary.py``: 100 -> 32 -> 32 -> 1, Bernoulli output,
AutoNormal, Adam).

The runs, each one JSON line on stdout, each in a fresh process (its peak RSS growth is its
own), the fit runs first:

- **fit_memory**: ``fit`` from NumPy arrays read whole from the store (``data_placement="host"``:
  the same batches as from the store, gathered from memory), ``--fit-epochs`` epochs.
- **fit_zarr_blocks**: from the store, ``shuffle=BlockShuffle(block_rows=chunk_rows,
  window_blocks=--window-blocks)``: a chunk of steps reads a few whole Zarr chunks. With
  ``--aligned`` both fits run compiled chunks of one window's steps (``steps_per_chunk`` and
  ``log_every_n_steps``: chunks end at log intervals); by default chunks of 50 steps straddle
  windows, and the fit's cache of decoded storage chunks serves the window two chunks share.
- **fit_zarr_rows** (``--exact-shuffle``): from the store, ``shuffle=True``, an exact
  permutation: a batch is a scatter of single rows over the store, so each compiled chunk
  decodes most of the store's chunks; the losses equal ``fit_memory``'s (it then uses
  ``shuffle=True`` too). Hopeless at 20 million rows: off by default.
- **predict_zarr** at ``--rows`` and at ``--small-rows`` (default ``rows // 10``, the first rows
  of the same store), and **predict_memory** at ``--small-rows`` from a NumPy array:
  ``Predictor.predict`` of ``--draws`` posterior draws (from the guide at its initial
  parameters: the values do not matter for speed), ``y`` and ``p`` written to a Zarr store in
  ``--dir``, batches of ``--predict-batch`` rows, after a one-batch warm-up (compilation is not
  in the figure).

Figures: ``steady_steps_per_s`` (steps after the first compiled chunk over the time they took,
so compilation is left out), ``wall_s``, ``cpu_ms_per_step`` (the fit's CPU time, every thread of
the process, over its steps: what reading costs, even on a machine shared with other work),
``rss_growth_mib`` (peak resident set during the call
over the resident set just before it: the in-memory arrays are built before), ``rows_read`` and
``bytes_read`` (a prediction's counted by a wrapper of the store; a fit's are the bytes the
process read from files during the fit, Linux's ``rchar``, and the rows they make). A last
line, ``"run": "summary"``, gives the ratios the issue sets bars for: the fit's ``steps_ratio``
(zarr blocks / memory, bar >= 0.8),
the prediction's ``rss_growth_ratio`` (``--rows`` / ``--small-rows``, bar <= 1.2),
``rss_growth_mib`` at ``--rows`` (bar <= 1024) and ``wall_ratio`` (zarr at ``--rows`` / (memory
at ``--small-rows`` x rows / small rows), bar <= 1.15).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_data.py --rows 200000 [--fit-epochs 2] [--draws 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from bench_fit import forwarded, load_recipe
from bench_predict import PeakRss

from aimz_trainer import BlockShuffle, Callback, Predictor, Trainer

RUNS = ("fit_memory", "fit_zarr_blocks", "fit_zarr_rows", "predict_zarr", "predict_memory")


class ChunkTimes(Callback):
    """The time and step of every finished chunk."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, int]] = []

    def on_train_chunk_end(self, trainer: Any, progress: Any, losses: Any, steps: Any) -> None:
        self.ends.append((time.perf_counter(), progress.step))


class CountedRows:
    """A lazy source over the first ``rows`` rows of ``source`` that counts the rows read."""

    def __init__(self, source: Any, rows: int) -> None:
        self.source, self.dtype = source, np.dtype(source.dtype)
        self.shape = (rows, *source.shape[1:])
        self.chunks = source.chunks  # read as the store itself is: once per storage chunk touched
        self.rows = 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        values = np.asarray(self.source[start:stop])
        self.rows += len(values)
        return values

    @property
    def bytes_read(self) -> int:
        return self.rows * math.prod(self.shape[1:]) * self.dtype.itemsize


def write_store(directory: Path, rows: int, cols: int, chunk_rows: int, seed: int) -> None:
    """The features and labels, written slab by slab (never all in memory at once). The
    features are stored uncompressed: normal floats do not compress, and decoding them would
    take CPU from the fit on a small machine."""
    import zarr

    rng = np.random.default_rng(seed)
    beta = rng.normal(size=cols).astype(np.float32) / np.sqrt(cols)
    X = zarr.create_array(
        directory / "X.zarr",
        shape=(rows, cols),
        chunks=(chunk_rows, cols),
        dtype=np.float32,
        compressors=None,
        overwrite=True,
    )
    y = zarr.create_array(directory / "y.zarr", shape=(rows,), chunks=(chunk_rows,), dtype=np.int32, overwrite=True)
    slab = max(chunk_rows, (64 << 20) // (4 * cols) // chunk_rows * chunk_rows)  # about 64 MB a slab
    for start in range(0, rows, slab):
        stop = min(start + slab, rows)
        features = rng.normal(size=(stop - start, cols)).astype(np.float32)
        X[start:stop] = features
        y[start:stop] = rng.random(stop - start) < 1 / (1 + np.exp(-(features @ beta)))
    X.attrs["settings"] = {"rows": rows, "cols": cols, "chunk_rows": chunk_rows, "seed": seed}


def store_matches(args: argparse.Namespace) -> bool:
    """Whether ``--dir`` already holds the store of these settings, complete (written by an
    earlier run: the seed is recorded last)."""
    import zarr

    try:
        X, y = open_arrays(args.dir, ("X", "y")).values()
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        return False
    settings = {"rows": args.rows, "cols": args.cols, "chunk_rows": args.chunk_rows, "seed": args.seed}
    return X.attrs.get("settings") == settings and y.shape == (args.rows,)


def bytes_read_so_far() -> int:
    """Bytes this process has read from files so far (Linux's ``rchar``, page cache included)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def open_arrays(directory: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The store's Zarr arrays ``names``, read-only."""
    import zarr

    return {name: zarr.open_array(directory / f"{name}.zarr", mode="r") for name in names}


def open_store(directory: Path, rows: int, names: tuple[str, ...]) -> dict[str, CountedRows]:
    return {name: CountedRows(array, rows) for name, array in open_arrays(directory, names).items()}


def fit_run(run: str, args: argparse.Namespace) -> dict[str, Any]:
    recipe = load_recipe(with_trainer=True)
    # The Zarr arrays themselves, as a user passes them; the bytes read are the process's own
    # count: whole storage chunks decoded, whatever rows a read returns.
    store = open_arrays(args.dir, ("X", "y"))
    data: dict[str, Any] = {name: array[:] for name, array in store.items()} if run == "fit_memory" else store
    blocks = BlockShuffle(block_rows=args.chunk_rows, window_blocks=args.window_blocks)
    shuffle = True if args.exact_shuffle else blocks
    if run == "fit_zarr_blocks":
        shuffle = blocks
    times = ChunkTimes()
    # --aligned: compiled chunks (and so the log's interval, where chunks end) of one window's
    # steps, so that a chunk reads its window's blocks once instead of parts of two windows.
    window_steps = args.chunk_rows * args.window_blocks // args.batch if args.aligned else None
    trainer = Trainer(
        max_epochs=args.fit_epochs, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=[times],
        steps_per_chunk=window_steps, log_every_n_steps=window_steps or 50,
    )  # fmt: skip
    model = recipe.make_model(args.rows, args.cols, 32, jax.random.key(1))
    with PeakRss() as rss:
        started, cpu_started, read_started = time.perf_counter(), time.process_time(), bytes_read_so_far()
        result = trainer.fit(
            recipe.make_svi(model), data, batch_size=args.batch, data_placement="host", shuffle=shuffle
        )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        bytes_read = bytes_read_so_far() - read_started
    (first_time, first_step), (last_time, last_step) = times.ends[0], times.ends[-1]
    counted = run != "fit_memory"
    return {
        "steps": int(result.losses.shape[0]),
        "shuffle": "blocks" if shuffle is blocks else "rows",
        "steady_steps_per_s": (last_step - first_step) / (last_time - first_time) if last_step > first_step else None,
        "wall_s": wall,
        "cpu_ms_per_step": 1e3 * cpu / int(result.losses.shape[0]),
        "rss_growth_mib": rss.growth_mib,
        "rows_read": bytes_read // sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in store.values())
        if counted
        else None,
        "bytes_read": bytes_read if counted else None,
        "losses_sha": hashlib.sha256(np.asarray(result.losses).tobytes()).hexdigest()[:16],
    }


def predict_run(run: str, args: argparse.Namespace, rows: int) -> dict[str, Any]:
    recipe = load_recipe(with_trainer=True)
    store = open_store(args.dir, rows, ("X",))
    X: Any = store["X"].source[:rows] if run == "predict_memory" else store["X"]
    warm_up = store["X"].source[: min(args.predict_batch, rows)]  # the measured call's batch shape: compiled once
    model = recipe.make_model(rows, args.cols, 32, jax.random.key(1))
    svi = recipe.make_svi(model)
    labels = open_arrays(args.dir, ("y",))["y"][:64]
    params = svi.get_params(svi.init(jax.random.key(2), warm_up[:64], y=labels))
    posterior = svi.guide.sample_posterior(jax.random.key(3), params, warm_up[:2], sample_shape=(args.draws,))
    predictor = Predictor(model, {k: v for k, v in posterior.items() if k != "p"}, rng_key=jax.random.key(4))
    with tempfile.TemporaryDirectory(prefix="predictions-", dir=args.dir) as output:
        predictor.predict({"X": warm_up}, batch_size=args.predict_batch, output_dir=output)
        store["X"].rows = 0
        with PeakRss() as rss:
            started = time.perf_counter()
            tree = predictor.predict({"X": X}, batch_size=args.predict_batch, output_dir=output)
            wall = time.perf_counter() - started
        assert tree["posterior_predictive"]["p"].shape == (1, args.draws, rows)
    counted = run == "predict_zarr"
    return {
        "rows": rows,
        "draws": args.draws,
        "wall_s": wall,
        "rss_growth_mib": rss.growth_mib,
        "rows_read": store["X"].rows if counted else None,
        "bytes_read": store["X"].bytes_read if counted else None,
    }


def spawn(run: str, args: argparse.Namespace, rows: int) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--only", run, "--dir", str(args.dir), "--rows", str(args.rows),
        "--run-rows", str(rows), *(["--exact-shuffle"] if args.exact_shuffle else []),
        *(["--aligned"] if args.aligned else []),
        *forwarded(args, "cols", "batch", "chunk_rows", "window_blocks", "fit_epochs", "draws", "predict_batch"),
    ]  # fmt: skip
    print(f"{run} at {rows} rows", file=sys.stderr, flush=True)
    # Each run with a hash seed of its own: the losses compared across runs do not depend on it.
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return {"run": run, **json.loads(completed.stdout.strip().splitlines()[-1])}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--small-rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fit-epochs", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--predict-batch", type=int, default=100_000)
    parser.add_argument("--exact-shuffle", action="store_true", help="also fit from the store with shuffle=True")
    parser.add_argument("--window-blocks", type=int, default=16)
    parser.add_argument(
        "--aligned", action="store_true", help="compiled chunks (and log intervals) of one shuffle window's steps"
    )
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out")
    parser.add_argument(
        "--dir", type=Path, default=None,
        help="where to write the store, kept (a later run of the same settings reuses it); default: a temporary one",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--run-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        figures = (
            fit_run(args.only, args) if args.only.startswith("fit") else predict_run(args.only, args, args.run_rows)
        )
        print(json.dumps(figures), flush=True)
        return

    small = args.small_rows or args.rows // 10
    temporary = args.dir is None
    args.dir = args.dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        started = time.perf_counter()
        if store_matches(args):
            print(f"using the store in {args.dir}", file=sys.stderr)
        else:
            write_store(args.dir, args.rows, args.cols, args.chunk_rows, args.seed)
            print(f"wrote {args.rows} x {args.cols} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        plan = [("fit_memory", args.rows), ("fit_zarr_blocks", args.rows)]
        plan += [("fit_zarr_rows", args.rows)] if args.exact_shuffle else []
        plan += [("predict_memory", small), ("predict_zarr", small), ("predict_zarr", args.rows)]
        results = []
        for run, rows in plan:
            if run in args.skip.split(","):
                continue
            results.append(spawn(run, args, rows))
            print(json.dumps(results[-1]), flush=True)
        print(json.dumps(summary(results, args.rows, small)), flush=True)
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)


def summary(results: list[dict[str, Any]], rows: int, small: int) -> dict[str, Any]:
    """The ratios the bars are set on (``None`` where a run was left out)."""
    found = {(result["run"], result.get("rows", rows)): result for result in results}

    def figure(run: str, at: int, name: str) -> float | None:
        return found[(run, at)][name] if (run, at) in found else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    memory_fit = figure("fit_memory", rows, "steady_steps_per_s")
    memory_losses = figure("fit_memory", rows, "losses_sha")
    big_rss, small_rss = figure("predict_zarr", rows, "rss_growth_mib"), figure("predict_zarr", small, "rss_growth_mib")
    memory_wall = figure("predict_memory", small, "wall_s")
    return {
        "run": "summary",
        "rows": rows,
        "small_rows": small,
        "fit_steps_ratio": ratio(figure("fit_zarr_blocks", rows, "steady_steps_per_s"), memory_fit),
        "fit_exact_steps_ratio": ratio(figure("fit_zarr_rows", rows, "steady_steps_per_s"), memory_fit),
        "fit_rss_growth_mib": figure("fit_zarr_blocks", rows, "rss_growth_mib"),
        # The memory fit shuffles as the exact run does when there is one, else as the blocks run.
        "fit_losses_equal_memory": memory_losses is not None
        and memory_losses in {figure(run, rows, "losses_sha") for run in ("fit_zarr_blocks", "fit_zarr_rows")},
        "predict_rss_growth_mib": big_rss,
        "predict_rss_growth_ratio": ratio(big_rss, small_rss),
        "predict_wall_ratio": ratio(figure("predict_zarr", rows, "wall_s"), memory_wall and memory_wall * rows / small),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
