"""Bayesian neural network for a binary outcome, fitted by minibatch SVI.

The reference tutorial's workflow on the Trainer: synthetic data (a linear logit signal through
a sigmoid, Bernoulli labels), a 3-layer flax nnx network whose weights get a Normal prior
(``random_nnx_module``), an AutoNormal guide, Adam, and ``plate(..., subsample_size=...)``
minibatch scaling. It prints the loss curve per epoch, the training speed and the shapes of the
posterior draws; ``--val-rows N`` also validates on N held-out rows every epoch and
``--log-dir DIR`` writes TensorBoard logs.

Run it with ``aimz-trainer run bnn_binary`` (100,000 rows, a few seconds) or with ``--full`` for
the tutorial's size (1,000,000 x 100, 10 epochs, 500 draws).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
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

from aimz_trainer import TensorBoardLogger, Trainer


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aimz-trainer run bnn_binary", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the tutorial's size: 1,000,000 rows, 10 epochs, 500 draws")
    parser.add_argument("--num-rows", type=int, default=None, help="rows of synthetic data (default 100,000)")
    parser.add_argument("--num-features", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-epochs", type=int, default=None, help="default 5 (10 with --full)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=None, help="posterior draws (default 100, 500 with --full)")
    parser.add_argument("--devices", type=int, default=None, help="devices on the data axis (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-rows", type=int, default=0, help="extra held-out rows to validate on every epoch")
    parser.add_argument("--log-dir", default=None, help="write TensorBoard logs here (tensorboard --logdir DIR)")
    args = parser.parse_args(argv)
    args.num_rows = args.num_rows or (1_000_000 if args.full else 100_000)
    args.max_epochs = args.max_epochs or (10 if args.full else 5)
    args.num_samples = args.num_samples if args.num_samples is not None else (500 if args.full else 100)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the printed summary as a dict."""
    args = parse_args(argv)
    rng_key = random.key(args.seed)
    key_data, key_net, key_fit = random.split(rng_key, 3)
    X, y, _ = make_data(args.num_rows + args.val_rows, args.num_features, key_data)
    train, held_out = (
        {"X": X[: args.num_rows], "y": y[: args.num_rows]},
        {"X": X[args.num_rows :], "y": y[args.num_rows :]},
    )
    model = make_model(args.num_rows, args.num_features, args.hidden, key_net)
    callbacks = [TensorBoardLogger(args.log_dir)] if args.log_dir else []
    trainer = Trainer(max_epochs=args.max_epochs, rng_key=key_fit, devices=args.devices, callbacks=callbacks)
    started = time.perf_counter()
    result = trainer.fit(
        make_svi(model),
        train,
        batch_size=args.batch_size,
        val_data=held_out if args.val_rows else None,
        num_samples=args.num_samples,
    )
    jax.block_until_ready(result.posterior)
    wall = time.perf_counter() - started

    per_epoch = [float(chunk.mean()) for chunk in np.array_split(result.losses, args.max_epochs)]
    summary = {
        "rows": args.num_rows,
        "devices": trainer.mesh.size,
        "data_placement": trainer.placement,
        "steps": int(result.losses.size),
        "epoch_mean_loss": per_epoch,
        "final_loss": float(result.losses[-1]),
        "steps_per_sec": trainer.callback_metrics.get("steps_per_sec"),
        "first_chunk_s": trainer.timings["first_chunk_s"],
        "fit_wall_s": wall,
        "posterior_shapes": {site: tuple(draws.shape) for site, draws in result.posterior.items()},
    }
    print(
        f"bnn_binary: {args.num_rows:,} rows x {args.num_features}, {summary['devices']} device(s), "
        f"data on {trainer.placement}"
    )
    print("loss per epoch (mean ELBO): " + ", ".join(f"{loss:,.0f}" for loss in per_epoch))
    print(f"final loss {summary['final_loss']:,.1f} after {summary['steps']} steps")
    print(
        f"speed: {summary['steps_per_sec'] or float('nan'):,.0f} steps/s steady, first chunk after "
        f"{summary['first_chunk_s']:.2f} s, fit with {args.num_samples} draws in {wall:.2f} s"
    )
    if args.val_rows:
        summary["val_loss"], summary["val_lpd"] = (
            trainer.callback_metrics["val_loss"],
            trainer.callback_metrics["val_lpd"],
        )
        print(
            f"held out ({args.val_rows:,} rows): ELBO loss per row {summary['val_loss']:.4f}, "
            f"mean lpd {summary['val_lpd']:.4f}"
        )
    print("posterior: " + ", ".join(f"{site} {shape}" for site, shape in summary["posterior_shapes"].items()))
    if args.log_dir:
        print(f"TensorBoard: tensorboard --logdir {args.log_dir}")
    return summary


if __name__ == "__main__":
    main()
