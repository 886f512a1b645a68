"""Fit benchmark: aimz_trainer's ``Trainer.fit`` against the best hand-written NumPyro loop.

Setting: the ``bnn_binary`` recipe's model (``recipes/bnn_binary.py``: flax nnx MLP
d -> 32 -> 32 -> 1, AutoNormal, Adam, Trace_ELBO) on n=100,000 rows x d=100, batch 2,000,
``--epochs`` epochs (default 20), then 500 posterior draws.

The two loops:

- **aimz**: ``Trainer(max_epochs=E, ...).fit(svi, {"X": X, "y": y}, batch_size=2000,
  num_samples=500)``; a callback records the time of every finished chunk.
- **aimz_grad_norm**: the same with ``Trainer(step_metrics=["grad_norm"])``: the global
  gradient norm of every step comes out of the compiled chunk with the losses.
- **aimz_callbacks**: the same as **aimz** with a monitored run's callbacks: ``ProgressBar`` (to stderr),
  ``TensorBoardLogger`` (a temporary directory: per-step loss, steps/s, epoch means,
  parameter histograms every epoch) and ``EarlyStopping("train_loss_epoch")`` (a patience that
  never runs out), ``log_every_n_steps=50``.
- **aimz_monitors**: the same as **aimz** with the monitoring callbacks ``ThroughputMonitor``,
  ``DeviceStatsMonitor`` and ``ModelSummary`` (no logger: what they cost is their own work at
  fit start and at every logging step, ``log_every_n_steps=50``).
- **handwritten**: X and y on the device; ``svi.init`` called eagerly (a jitted ``svi.init``
  leaks tracers into the AutoGuide); one jitted call per epoch (state donated) that takes the
  epoch's permutation, computed on the host with NumPy, and runs ``lax.scan`` over the
  minibatches, gathering rows on the device; losses fetched once per epoch; then the draws from
  ``svi.guide.sample_posterior`` (jitted).

Figures, per loop:

- steady steps/s: steps finished after the first epoch divided by the time they took;
- first step: seconds from the start of the training code (the ``fit`` call; for the
  hand-written loop, putting X, y on the device and ``svi.init``) to the first finished chunk
  or epoch;
- fit wall: the training code through the ready posterior draws;
- cold wall: the whole process, from spawn to exit (imports, data, compilation, training,
  draws).

Every run is a fresh subprocess of this script (``--only aimz`` or ``--only handwritten``, which
prints that run's figures as one JSON line), so each run yields both its steady-state figures
and its cold wall. The runs alternate between the loops, one at a time, ``--repeats`` times,
and the medians are reported: machine noise hits both loops alike. The hand-written process
does not import aimz_trainer (the recipe's ``from aimz_trainer import Trainer`` gets a
placeholder there), so its cold wall is what a plain NumPyro user pays.

The bars (reported, not asserted): aimz steady steps/s >= 0.9x the hand-written loop, and
>= 0.85x with the callbacks on; with gradient norms on >= 0.95x aimz without them; aimz first
step <= 3 s; aimz cold wall <= 1.1x the hand-written one; with the monitors >= 0.95x aimz
without them.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_fit.py [--epochs 20] [--repeats 3]
    .venv/bin/python benchmarks/bench_fit.py --monitors [--repeats 3]   # aimz with and without the monitors

It prints one JSON line with all figures on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bnn_binary.py"
LOOPS = ("aimz", "aimz_grad_norm", "aimz_callbacks", "aimz_monitors", "handwritten")
STEPS_PER_SEC_BAR = 0.9
CALLBACKS_STEPS_PER_SEC_BAR = 0.85
GRAD_NORM_STEPS_PER_SEC_BAR = 0.95
MONITORS_STEPS_PER_SEC_BAR = 0.95
FIRST_STEP_BAR_S = 3.0
COLD_WALL_BAR = 1.1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (medians reported)")
    parser.add_argument("--num-rows", type=int, default=100_000)
    parser.add_argument("--num-features", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=LOOPS, help="run one loop in this process and print its figures")
    default_loops = [loop for loop in LOOPS if loop != "aimz_monitors"]  # --monitors compares those
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=default_loops, help="the loops to compare")
    parser.add_argument("--monitors", action="store_true", help="only aimz with and without the monitors")
    args = parser.parse_args(argv)
    if args.monitors:
        args.loops = ["aimz_monitors"]
    return args


def load_recipe(*, with_trainer: bool) -> ModuleType:
    """Import ``recipes/bnn_binary.py``; without the trainer, its aimz_trainer import is a placeholder."""
    spec = importlib.util.spec_from_file_location("bnn_binary", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while it is defined
    if with_trainer:
        spec.loader.exec_module(module)
        return module
    placeholders = {name: _Placeholder(name) for name in ("aimz_trainer", "aimz_trainer.recipe")}
    sys.modules.update(placeholders)
    try:
        spec.loader.exec_module(module)
    finally:
        for name in placeholders:
            del sys.modules[name]
    return module


class _Placeholder(ModuleType):
    """A stand-in for an aimz_trainer module whose every public name is a function that does
    nothing: the recipe's imports and its declaration (``RECIPE = Recipe(...)``) succeed in a
    process that must not import the library (the hand-written loop)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def chunk_clock() -> Any:
    """A callback that records ``(time, steps finished)`` in ``.marks`` at every chunk end
    (what :func:`steady_steps_per_sec` reads), and the fit's own training clock at fit end
    (``.timing``). It imports aimz_trainer: aimz runs only."""
    from aimz_trainer.callbacks import Callback

    class ChunkClock(Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.timing: Any = None

        def on_train_chunk_end(self, trainer: Any, progress: Any, losses: Any, steps: range) -> None:
            self.marks.append((time.perf_counter(), steps.stop))

        def on_fit_end(self, fit: Any, progress: Any) -> None:
            self.timing = fit.timing

    return ChunkClock()


def steady_steps_per_sec(marks: Sequence[tuple[float, int]], steps_per_epoch: int) -> float:
    """Steps per second between the first mark at or after the end of epoch 1 and the last mark.

    ``marks`` holds ``(time, steps finished)`` pairs, in order.
    """
    start_time, start_steps = next((t, s) for t, s in marks if s >= steps_per_epoch)
    end_time, end_steps = marks[-1]
    return (end_steps - start_steps) / (end_time - start_time)


def run_aimz(
    args: argparse.Namespace, *, with_callbacks: bool, with_monitors: bool = False, step_metrics: Sequence[str] = ()
) -> dict[str, Any]:
    """Fit with the Trainer; its steady speed comes from the times of the chunk-end hooks."""
    import tempfile

    import jax

    from aimz_trainer import (
        DeviceStatsMonitor,
        EarlyStopping,
        ModelSummary,
        ProgressBar,
        TensorBoardLogger,
        ThroughputMonitor,
        Trainer,
    )
    from aimz_trainer.callbacks import Callback

    recipe = load_recipe(with_trainer=True)
    key_data, key_net, key_fit = jax.random.split(jax.random.key(args.seed), 3)
    X, y, _ = recipe.make_data(args.num_rows, args.num_features, key_data)
    svi = recipe.make_svi(recipe.make_model(args.num_rows, args.num_features, args.hidden, key_net))
    clock = chunk_clock()
    callbacks: list[Callback] = [clock]
    log_dir = tempfile.TemporaryDirectory(prefix="bench-fit-tb-")
    if with_callbacks:
        callbacks += [
            ProgressBar(),
            TensorBoardLogger(log_dir.name),
            EarlyStopping("train_loss_epoch", patience=args.epochs + 1),
        ]
    if with_monitors:
        callbacks += [ThroughputMonitor(), DeviceStatsMonitor(), ModelSummary(print_table=False)]
    trainer = Trainer(
        max_epochs=args.epochs,
        rng_key=key_fit,
        callbacks=callbacks,
        log_every_n_steps=50,
        enable_progress_bar=False,
        step_metrics=list(step_metrics),
    )

    started = time.perf_counter()
    result = trainer.fit(svi, {"X": X, "y": y}, batch_size=args.batch_size, num_samples=args.num_samples)
    jax.block_until_ready(result.posterior)
    wall = time.perf_counter() - started
    log_dir.cleanup()

    return {
        "steps": int(result.losses.size),
        "final_loss": float(result.losses[-1]),
        "steps_per_sec": steady_steps_per_sec(clock.marks, trainer.steps_per_epoch),
        # The loop's training clock (every step after the first chunk, validation left out).
        "train_clock_steps_per_sec": clock.timing.steps_per_sec,
        "first_step_s": trainer.timings["first_chunk_s"],
        "setup_s": trainer.timings["setup_s"],
        "fit_wall_s": wall,
        "chunk_ends_s": [round(t - started, 4) for t, _ in clock.marks],
        "placement": trainer.placement,
    }


def run_handwritten(args: argparse.Namespace) -> dict[str, Any]:
    """The best hand-written loop: one jitted ``lax.scan`` per epoch over a host-made permutation."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from numpyro.infer.svi import SVIState

    recipe = load_recipe(with_trainer=False)
    key_data, key_net, key_fit = jax.random.split(jax.random.key(args.seed), 3)
    init_key, sample_key = jax.random.split(key_fit)
    X_host, y_host, _ = recipe.make_data(args.num_rows, args.num_features, key_data)
    svi = recipe.make_svi(recipe.make_model(args.num_rows, args.num_features, args.hidden, key_net))
    batch = args.batch_size
    steps_per_epoch = args.num_rows // batch
    shuffler = np.random.default_rng(args.seed)

    def epoch(state: SVIState, X: jax.Array, y: jax.Array, order: jax.Array) -> tuple[SVIState, jax.Array]:
        def step(state: SVIState, rows: jax.Array) -> tuple[SVIState, jax.Array]:
            return svi.update(state, X[rows], y=y[rows])

        return lax.scan(step, state, order)

    run_epoch = jax.jit(epoch, donate_argnums=0)

    started = time.perf_counter()
    X, y = jnp.asarray(X_host), jnp.asarray(y_host)
    state = svi.init(init_key, X[:batch], y=y[:batch])
    marks: list[tuple[float, int]] = []
    losses: list[np.ndarray] = []
    for index in range(args.epochs):
        order = shuffler.permutation(args.num_rows)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        state, epoch_losses = run_epoch(state, X, y, order)
        losses.append(np.asarray(epoch_losses))
        marks.append((time.perf_counter(), (index + 1) * steps_per_epoch))
    draw = jax.jit(
        lambda key, params: svi.guide.sample_posterior(key, params, X=X[:batch], sample_shape=(args.num_samples,))
    )
    posterior = draw(sample_key, svi.get_params(state))
    jax.block_until_ready(posterior)
    wall = time.perf_counter() - started

    all_losses = np.concatenate(losses)
    return {
        "steps": int(all_losses.size),
        "final_loss": float(all_losses[-1]),
        "steps_per_sec": steady_steps_per_sec(marks, steps_per_epoch),
        "first_step_s": marks[0][0] - started,
        "fit_wall_s": wall,
        "epoch_ends_s": [round(t - started, 4) for t, _ in marks],
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One loop in this process, with the versions and devices it ran on."""
    if args.only == "handwritten":
        figures = run_handwritten(args)
    else:
        step_metrics = ["grad_norm"] if args.only == "aimz_grad_norm" else []
        figures = run_aimz(
            args,
            with_callbacks=args.only == "aimz_callbacks",
            with_monitors=args.only == "aimz_monitors",
            step_metrics=step_metrics,
        )
    import jax
    import numpyro

    return {
        "loop": args.only,
        **figures,
        "jax_version": jax.__version__,
        "numpyro_version": numpyro.__version__,
        "devices": [str(device) for device in jax.devices()],
    }


def forwarded(args: argparse.Namespace, *names: str) -> list[str]:
    """``--name value`` for each named option of ``args``: a measured child process's settings."""
    return [part for name in names for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def spawn(loop: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one loop in a fresh process; add its whole-process wall as ``cold_wall_s``."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--only", loop,
        *forwarded(args, "epochs", "num_rows", "num_features", "hidden", "batch_size", "num_samples", "seed"),
    ]  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
    cold_wall = time.perf_counter() - started
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**figures, "cold_wall_s": cold_wall}


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate fresh-process runs of the two loops; medians, ratios and the bars."""
    loops = [loop for loop in LOOPS if loop in args.loops or loop == "aimz"]  # aimz: every ratio's base
    runs: dict[str, list[dict[str, Any]]] = {loop: [] for loop in loops}
    for repeat in range(args.repeats):
        order = loops if repeat % 2 == 0 else loops[::-1]  # machine drift hits every loop alike
        for loop in order:
            run = spawn(loop, args)
            runs[loop].append(run)
            print(
                f"[{repeat + 1}/{args.repeats}] {loop}: {run['steps_per_sec']:,.0f} steps/s steady, "
                f"first step {run['first_step_s']:.2f} s, fit {run['fit_wall_s']:.2f} s, "
                f"cold wall {run['cold_wall_s']:.2f} s",
                file=sys.stderr,
            )
    aimz = runs["aimz"]
    figures: dict[str, Any] = {
        "benchmark": "fit",
        "n": args.num_rows,
        "num_features": args.num_features,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "steps": aimz[0]["steps"],
        "num_samples": args.num_samples,
        "repeats": args.repeats,
    }
    for loop, loop_runs in runs.items():
        for key in ("steps_per_sec", "first_step_s", "fit_wall_s", "cold_wall_s"):
            figures[f"{loop}_{key}"] = median_of(loop_runs, key)
    figures["aimz_setup_s"] = median_of(aimz, "setup_s")
    bars: dict[str, bool] = {f"aimz_first_step_s<={FIRST_STEP_BAR_S}": figures["aimz_first_step_s"] <= FIRST_STEP_BAR_S}
    ratios = [  # (name, loop, baseline loop, bar)
        ("steps_per_sec_ratio", "aimz", "handwritten", STEPS_PER_SEC_BAR),
        ("callbacks_steps_per_sec_ratio", "aimz_callbacks", "handwritten", CALLBACKS_STEPS_PER_SEC_BAR),
        ("grad_norm_steps_per_sec_ratio", "aimz_grad_norm", "aimz", GRAD_NORM_STEPS_PER_SEC_BAR),
        ("monitors_steps_per_sec_ratio", "aimz_monitors", "aimz", MONITORS_STEPS_PER_SEC_BAR),
    ]
    for name, loop, baseline, bar in ratios:
        if loop in runs and baseline in runs:
            figures[name] = figures[f"{loop}_steps_per_sec"] / figures[f"{baseline}_steps_per_sec"]
            bars[f"{name}>={bar}"] = figures[name] >= bar
    if "handwritten" in runs:
        figures["cold_wall_ratio"] = figures["aimz_cold_wall_s"] / figures["handwritten_cold_wall_s"]
        bars[f"cold_wall_ratio<={COLD_WALL_BAR}"] = figures["cold_wall_ratio"] <= COLD_WALL_BAR
    figures["bars_met"] = bars
    figures["runs"] = {
        loop: {key: [run[key] for run in loop_runs] for key in ("steps_per_sec", "first_step_s", "cold_wall_s")}
        for loop, loop_runs in runs.items()
    }
    figures["final_loss"] = {loop: loop_runs[-1]["final_loss"] for loop, loop_runs in runs.items()}
    figures["aimz_placement"] = aimz[0]["placement"]
    figures["jax_version"] = aimz[0]["jax_version"]
    figures["numpyro_version"] = aimz[0]["numpyro_version"]
    figures["python"] = platform.python_version()
    figures["devices"] = aimz[0]["devices"]
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    figures = run_one(args) if args.only else compare(args)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
