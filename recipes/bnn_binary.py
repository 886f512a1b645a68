"""Bayesian neural network for a binary outcome: the reference tutorial as a monitored run.

What it shows: the tutorial's workflow (synthetic data with a linear logit signal through a
sigmoid and Bernoulli labels; a 3-layer flax nnx network whose weights get a Normal prior via
``random_nnx_module``; an AutoNormal guide, Adam, and ``plate(..., subsample_size=...)``
minibatch scaling) on the Trainer with what a real run needs: validation on held-out rows every
epoch, early stopping on the validation ELBO, TensorBoard logs, checkpoints (``--resume``
continues an interrupted run), the posterior-predictive store of the training rows written to
Zarr by the Predictor, and an evaluation of the held-out predictions against the labels and the
true probabilities (accuracy, AUC, calibration).

Run it with ``aimz-trainer run bnn_binary`` (100,000 rows, about a minute on 2 cores) or with
``--full`` for the tutorial's size (1,000,000 x 100, 10 epochs, 500 draws, predictions in
batches of 100,000). Everything goes under ``--output-dir`` (default: a new
``runs/bnn_binary/run-<time>``): ``logs/`` (``tensorboard --logdir OUTPUT/logs``),
``checkpoints/`` and ``predictions/``; ``--resume`` continues the newest run (or ``--output-dir``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from flax import nnx
from jax import Array, random
from jax.typing import ArrayLike
from numpyro import deterministic, plate, sample
from numpyro.contrib.module import random_nnx_module
from numpyro.infer import SVI, Trace_ELBO, init_to_uniform
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import EarlyStopping, ModelCheckpoint, TensorBoardLogger, Trainer
from aimz_trainer.distributed import allgather_json


class MLP(nnx.Module):
    """Three dense layers with ReLU, a sigmoid output: the tutorial's network."""

    def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs) -> None:
        self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
        self.linear2 = nnx.Linear(dmid, dmid, rngs=rngs)
        self.linear3 = nnx.Linear(dmid, dout, rngs=rngs)

    def __call__(self, x: ArrayLike) -> Array:
        x = nnx.relu(self.linear1(x))
        x = nnx.relu(self.linear2(x))
        return nnx.sigmoid(self.linear3(x)).squeeze(-1)


def make_data(num_rows: int, num_features: int, rng_key: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` (standard normal), ``y`` (Bernoulli labels) and the true probabilities, on the host."""
    key_x, key_beta, key_y = random.split(rng_key, 3)
    X = random.normal(key_x, (num_rows, num_features))
    beta = random.normal(key_beta, (num_features,))
    p_true = nnx.sigmoid(X @ beta)
    y = random.bernoulli(key_y, p_true).astype(jnp.int32)
    return np.asarray(X), np.asarray(y), np.asarray(p_true)


def make_model(num_rows: int, num_features: int, hidden: int, rng_key: Array) -> Callable[..., None]:
    """The tutorial's kernel: a Bayesian MLP with a Bernoulli likelihood and a ``p`` site."""
    network = MLP(num_features, hidden, 1, rngs=nnx.Rngs(params=rng_key))

    def model(X: ArrayLike, *, y: ArrayLike | None = None) -> None:
        nn_p = random_nnx_module("nn_p", nn_module=network, scope_divider="_", prior=dist.Normal())
        with plate("data", size=num_rows, subsample_size=len(X)):
            p = nn_p(X)
            deterministic("p", p)
            sample("y", dist.Bernoulli(p), obs=y)

    return model


def make_svi(model: Callable[..., None], learning_rate: float = 1e-3) -> SVI:
    """AutoNormal guide, Adam and Trace_ELBO, as in the tutorial."""
    guide = AutoNormal(model=model, init_loc_fn=init_to_uniform(radius=0.1))
    return SVI(model, guide=guide, optim=adam(learning_rate=learning_rate), loss=Trace_ELBO())


RUNS = "runs/bnn_binary"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aimz-trainer run bnn_binary", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the tutorial's size: 1,000,000 rows, 10 epochs, 500 draws")
    parser.add_argument("--num-rows", type=int, default=None, help="training rows (default 100,000)")
    parser.add_argument("--num-features", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-epochs", type=int, default=None, help="default 5 (10 with --full)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=None, help="posterior draws (default 100, 500 with --full)")
    parser.add_argument("--predict-batch-size", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=None, help="devices on the data axis (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-rows", type=int, default=None, help="held-out rows (default 10%% of --num-rows)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without a better val_loss before stopping")
    parser.add_argument(
        "--output-dir", default=None, help=f"where logs, checkpoints and predictions go (default: {RUNS}/run-<time>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --output-dir (default: newest run)",
    )
    args = parser.parse_args(argv)
    args.num_rows = args.num_rows or (1_000_000 if args.full else 100_000)
    args.max_epochs = args.max_epochs or (10 if args.full else 5)
    args.num_samples = args.num_samples if args.num_samples is not None else (500 if args.full else 100)
    args.val_rows = args.val_rows if args.val_rows is not None else max(args.num_rows // 10, 1)
    if args.val_rows < 1:  # the summary's held-out accuracy, AUC and calibration need rows
        parser.error(f"--val-rows must be at least 1; got {args.val_rows}.")
    args.output_dir = output_directory(args.output_dir, args.resume, parser)
    return args


def output_directory(requested: str | None, resume: bool, parser: argparse.ArgumentParser) -> Path:
    """The run's directory: a new ``runs/bnn_binary/run-<time>`` by default, the newest one
    when resuming; a directory that already holds checkpoints is only reused by ``--resume``."""
    if requested is None and resume:
        runs = sorted(Path(RUNS).glob("run-*"))
        if not runs:
            parser.error(f"--resume found no earlier run in {RUNS}/; pass --output-dir")
        return runs[-1]
    # Process 0's choice for every process of a multi-process run (their clocks may differ).
    directory = Path(allgather_json(requested or f"{RUNS}/run-{time.strftime('%Y%m%d-%H%M%S')}")[0])
    if not resume and any((directory / "checkpoints").glob("[0-9]*")):
        parser.error(f"{directory} holds checkpoints of an earlier run: add --resume, or pass another --output-dir")
    return directory


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative (ties
    count half), from the ranks of the scores."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positives = labels.astype(bool)
    num_pos, num_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def calibration_error(predicted: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the row-weighted mean gap between the mean predicted
    probability and the observed frequency in ``bins`` equal-width probability bins."""
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    gaps = [
        abs(predicted[which == b].mean() - labels[which == b].mean()) * np.mean(which == b)
        for b in range(bins)
        if np.any(which == b)
    ]
    return float(np.sum(gaps))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the printed summary as a dict."""
    from aimz_trainer import Predictor  # loads xarray: only when the recipe runs

    args = parse_args(argv)
    output_dir = args.output_dir
    log_dir, checkpoint_dir, store_dir = output_dir / "logs", output_dir / "checkpoints", output_dir / "predictions"
    key_data, key_net, key_fit, key_predict = random.split(random.key(args.seed), 4)
    X, y, p_true = make_data(args.num_rows + args.val_rows, args.num_features, key_data)
    n = args.num_rows
    train, held_out = {"X": X[:n], "y": y[:n]}, {"X": X[n:], "y": y[n:]}
    model = make_model(n, args.num_features, args.hidden, key_net)
    checkpoint = ModelCheckpoint(checkpoint_dir, monitor="val_loss", save_top_k=1)
    callbacks = [
        TensorBoardLogger(log_dir),
        EarlyStopping("val_loss", patience=args.patience),
        checkpoint,
    ]
    trainer = Trainer(max_epochs=args.max_epochs, rng_key=key_fit, devices=args.devices, callbacks=callbacks)
    started = time.perf_counter()
    result = trainer.fit(
        make_svi(model),
        train,
        batch_size=args.batch_size,
        val_data=held_out,
        num_samples=args.num_samples,
        ckpt_path="last" if args.resume else None,
    )
    jax.block_until_ready(result.posterior)
    fit_wall = time.perf_counter() - started

    started = time.perf_counter()
    predictor = Predictor(model, result.posterior, mesh=trainer.mesh, rng_key=key_predict)
    store = predictor.predict({"X": train["X"]}, batch_size=args.predict_batch_size, output_dir=store_dir)
    held_out_tree = predictor.predict(
        held_out, batch_size=args.predict_batch_size, output_dir=store_dir, in_sample=False, return_sites=["p"]
    )
    predict_wall = time.perf_counter() - started
    p_mean = held_out_tree["predictions"]["p"].mean(("chain", "draw")).values
    p_true_held_out, labels = p_true[n:], held_out["y"]

    epochs_run = -(-result.losses.size // trainer.steps_per_epoch)
    per_epoch = [float(chunk.mean()) for chunk in np.array_split(result.losses, epochs_run)]
    summary = {
        "rows": n,
        "devices": trainer.mesh.size,
        "steps": int(result.losses.size),
        "epochs": len(per_epoch),
        "stopped_early": trainer.stop_reason,
        "epoch_mean_loss": per_epoch,
        "final_loss": float(result.losses[-1]),
        "val_loss": trainer.callback_metrics["val_loss"],
        "val_lpd": trainer.callback_metrics["val_lpd"],
        "steps_per_sec": trainer.callback_metrics.get("steps_per_sec"),
        "fit_wall_s": fit_wall,
        "predict_wall_s": predict_wall,
        "accuracy": float(np.mean((p_mean > 0.5) == labels)),
        "accuracy_of_true_p": float(np.mean((p_true_held_out > 0.5) == labels)),
        "auc": auc(p_mean, labels),
        "auc_of_true_p": auc(p_true_held_out, labels),
        "calibration_error": calibration_error(p_mean, labels),
        "mean_abs_error_to_true_p": float(np.mean(np.abs(p_mean - p_true_held_out))),
        "posterior_shapes": {site: tuple(draws.shape) for site, draws in result.posterior.items()},
        "store": store.attrs["store_path"],
        "store_shapes": {name: tuple(store["posterior_predictive"][name].shape) for name in ("y", "p")},
        "log_dir": str(log_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "best_checkpoint": checkpoint.best_model_path,
    }
    print(f"bnn_binary: {n:,} rows x {args.num_features}, {summary['devices']} device(s), data on {trainer.placement}")
    print("loss per epoch (mean ELBO): " + ", ".join(f"{loss:,.0f}" for loss in per_epoch))
    stopped = f", stopped early: {trainer.stop_reason}" if trainer.stop_reason else ""
    print(f"final ELBO loss {summary['final_loss']:,.1f} after {summary['steps']} steps{stopped}")
    print(
        f"speed: {summary['steps_per_sec'] or float('nan'):,.0f} steps/s steady; fit with {args.num_samples} draws "
        f"{fit_wall:.1f} s, predictions {predict_wall:.1f} s"
    )
    print(
        f"held out ({args.val_rows:,} rows): ELBO loss per row {summary['val_loss']:.4f}, mean lpd "
        f"{summary['val_lpd']:.4f}"
    )
    print(
        f"held out: accuracy {summary['accuracy']:.3f} (true p: {summary['accuracy_of_true_p']:.3f}), AUC "
        f"{summary['auc']:.3f} (true p: {summary['auc_of_true_p']:.3f}), calibration error "
        f"{summary['calibration_error']:.3f}, mean |p - true p| {summary['mean_abs_error_to_true_p']:.3f}"
    )
    print("posterior: " + ", ".join(f"{site} {shape}" for site, shape in summary["posterior_shapes"].items()))
    print(f"predictions: {summary['store']} (y {summary['store_shapes']['y']}, p {summary['store_shapes']['p']})")
    print(f"checkpoints: {checkpoint_dir} (best: {checkpoint.best_model_path})")
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    predictor.cleanup()
    return summary


if __name__ == "__main__":
    main()
