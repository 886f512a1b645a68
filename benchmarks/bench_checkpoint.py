"""Checkpoint benchmark: what saving a checkpoint every epoch costs a fit, and save/restore times.

Setting: the fit benchmark's model (``recipes/bnn_binary.py``: a d -> 32 -> 32 -> 1 Bayesian
MLP, batch 2,000) on the reference workflow's 1,000,000 x 100 rows (500 steps, about 0.4 s, per
epoch), ``--epochs`` epochs. ``--num-rows 100000`` gives 50-step epochs of ~37 ms: a save costs
a fixed 12-16 ms of CPU on the writer thread (orbax's step bookkeeping and the .npz's overhead
per named array, not the bytes), which two shared cores pay out of training, so there
checkpointing every epoch costs over 10%.

The two loops, each in fresh subprocesses, alternating, ``--repeats`` times (medians):

- **plain**: ``Trainer(max_epochs=E).fit(...)``;
- **checkpointed**: the same with ``ModelCheckpoint(dirpath, every_n_epochs=1)``
  (asynchronous orbax saves, the latest one kept), in a temporary directory.

Figures: steady steps/s of both (steps after the first epoch over their time, from the chunk
ends) and their ratio (the bar: >= 0.95, i.e. checkpointing costs < 5%); the time a save
blocks the training loop (median over the fit's saves); a synchronous save of the final state
(``async_save=False``); a restore of that checkpoint onto the live state's shardings, and a
resumed fit's set-up (compile + restore) next to a fresh fit's.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_checkpoint.py [--epochs 6] [--repeats 3] [--num-rows 1000000]

It prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_fit import chunk_clock, forwarded, load_recipe, median_of, steady_steps_per_sec

LOOPS = ("plain", "checkpointed")
STEPS_PER_SEC_BAR = 0.95


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=LOOPS, help="run one loop in this process and print its figures")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from aimz_trainer import Callback, ModelCheckpoint, Trainer
    from aimz_trainer.checkpoint import restore_state, save_args

    class TimedCheckpoint(ModelCheckpoint):
        """Records how long each save blocks the loop (the host snapshot + the hand-off to the
        writer thread)."""

        def __init__(self, dirpath: str) -> None:
            super().__init__(dirpath)
            self.blocking: list[float] = []

        def save(self, trainer: Any, progress: Any) -> None:
            started = time.perf_counter()
            super().save(trainer, progress)
            self.blocking.append(time.perf_counter() - started)

    recipe = load_recipe(with_trainer=True)
    key_data, key_net, key_fit = jax.random.split(jax.random.key(args.seed), 3)
    X, y, _ = recipe.make_data(args.num_rows, 100, key_data)
    data = {"X": X, "y": y}

    def svi() -> Any:
        return recipe.make_svi(recipe.make_model(args.num_rows, 100, 32, key_net))

    clock = chunk_clock()
    directory = tempfile.TemporaryDirectory(prefix="bench-ckpt-")
    callbacks: list[Callback] = [clock]
    checkpoint = TimedCheckpoint(directory.name) if args.only == "checkpointed" else None
    if checkpoint is not None:
        callbacks.append(checkpoint)
    trainer = Trainer(max_epochs=args.epochs, rng_key=key_fit, callbacks=callbacks, enable_progress_bar=False)
    result = trainer.fit(svi(), data, batch_size=args.batch_size)
    figures: dict[str, Any] = {
        "loop": args.only,
        "steps_per_sec": steady_steps_per_sec(clock.marks, trainer.steps_per_epoch),
        "setup_s": trainer.timings["setup_s"],
        "final_loss": float(result.losses[-1]),
    }
    if checkpoint is not None:
        figures["save_blocking_s"] = statistics.median(checkpoint.blocking)
        figures["saves"] = len(checkpoint.blocking)
        # A synchronous save of the final state, then a restore of it onto the live shardings.
        import orbax.checkpoint as ocp

        final = Path(directory.name) / "sync"
        contents = trainer.checkpoint()
        started = time.perf_counter()
        with ocp.CheckpointManager(final, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)) as m:
            m.save(result.losses.size, args=save_args(contents["state"], contents["meta"]), force=True)
        figures["save_sync_s"] = time.perf_counter() - started
        started = time.perf_counter()
        restored = restore_state(final / str(result.losses.size), contents["state"])
        jax.block_until_ready(restored)
        figures["restore_s"] = time.perf_counter() - started
        assert np.array_equal(restored["losses"], result.losses)
        # A resumed fit (one more epoch) against the fresh fit's set-up: compile + restore.
        resumed = Trainer(
            max_epochs=args.epochs + 1, rng_key=key_fit, callbacks=[ModelCheckpoint(directory.name)],
            enable_progress_bar=False,
        )  # fmt: skip
        resumed.fit(svi(), data, batch_size=args.batch_size, ckpt_path="last")
        figures["resumed_setup_s"] = resumed.timings["setup_s"]
    directory.cleanup()
    return figures


def spawn(loop: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--only", loop,
        *forwarded(args, "epochs", "num_rows", "batch_size", "seed"),
    ]  # fmt: skip
    # A fixed hash seed: numpyro's Trace_ELBO sums its per-site terms in set order, so the
    # reported losses (not the parameters) differ by an ulp between processes otherwise.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {loop: [] for loop in LOOPS}
    for repeat in range(args.repeats):
        for loop in LOOPS if repeat % 2 == 0 else LOOPS[::-1]:  # machine drift hits both alike
            run = spawn(loop, args)
            runs[loop].append(run)
            print(f"[{repeat + 1}/{args.repeats}] {loop}: {run['steps_per_sec']:,.0f} steps/s", file=sys.stderr)
    checkpointed = runs["checkpointed"]
    figures: dict[str, Any] = {
        "benchmark": "checkpoint",
        "n": args.num_rows,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "plain_steps_per_sec": median_of(runs["plain"], "steps_per_sec"),
        "checkpointed_steps_per_sec": median_of(checkpointed, "steps_per_sec"),
    }
    figures["steps_per_sec_ratio"] = figures["checkpointed_steps_per_sec"] / figures["plain_steps_per_sec"]
    for key in ("save_blocking_s", "save_sync_s", "restore_s", "resumed_setup_s"):
        figures[key] = median_of(checkpointed, key)
    figures["fresh_setup_s"] = median_of(runs["plain"], "setup_s")
    figures["saves_per_fit"] = checkpointed[0]["saves"]
    figures[f"bar_met_steps_per_sec_ratio>={STEPS_PER_SEC_BAR}"] = figures["steps_per_sec_ratio"] >= STEPS_PER_SEC_BAR
    figures["same_final_loss"] = len({run["final_loss"] for loop_runs in runs.values() for run in loop_runs}) == 1
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    figures = run_one(args) if args.only else compare(args)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
