"""Writing your own callback: follow one parameter's posterior mean in TensorBoard, every epoch.

A callback subclasses :class:`aimz_trainer.Callback` and overrides only the hooks it needs;
every hook gets the running fit's context (``fit``: step, epoch, metrics, parameters,
``log``, ``request_stop``) and a ``FitProgress`` (step, epoch, metrics), all host values. This
one uses a single epoch-level hook, so it costs nothing per step: the parameters it reads with
``fit.current_params()`` come out of the compiled chunk that just finished, and ``fit.log``
hands each value to every logger of the fit (here TensorBoard and a CSV file) as a curve at
the current step: no writer of its own, and the loggers deal with process 0, resumes and
closing.

The model is a Bayesian linear regression, ``y ~ Normal(X @ beta + alpha, sigma)``, fitted by
minibatch SVI; the callback logs the posterior mean of each coefficient of ``beta`` (the
guide's ``beta_auto_loc``) next to the built-in curves, and the recipe prints where they went.
Watch them with ``tensorboard --logdir <log dir>``.

Run it with ``aimz-trainer run custom_callback [--output-dir runs/custom] [--max-epochs 20]``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import Callback, CSVLogger, FitContext, FitProgress, TensorBoardLogger, Trainer


class PosteriorMeanLogger(Callback):
    """Logs the posterior mean of each element of one variational parameter every epoch, as
    ``posterior_mean/<param>/<index>``.

    Args:
        param: the variational parameter to follow, e.g. ``"beta_auto_loc"`` for the mean of
            an ``AutoNormal`` guide's ``beta`` site.

    Example:
        >>> logger = PosteriorMeanLogger(param="beta_auto_loc")
    """

    def __init__(self, param: str) -> None:
        self.param = param

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        if self.param not in fit.current_params():
            raise KeyError(f"no variational parameter {self.param!r}; there are {sorted(fit.current_params())}")

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        means = np.atleast_1d(np.asarray(fit.current_params()[self.param]))
        fit.log_dict({f"posterior_mean/{self.param}/{index}": float(mean) for index, mean in enumerate(means)})


def make_data(num_rows: int, num_features: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Synthetic regression data and the true coefficients."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=num_features).astype(np.float32)
    X = rng.normal(size=(num_rows, num_features)).astype(np.float32)
    y = (X @ beta + 0.5 + 0.3 * rng.normal(size=num_rows)).astype(np.float32)
    return {"X": X, "y": y}, beta


def make_model(num_rows: int, num_features: int) -> Callable[..., None]:
    def model(X: Any, y: Any = None) -> None:
        beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([num_features]).to_event(1))
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("data", num_rows, subsample_size=X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ beta + alpha, sigma), obs=y)

    return model


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit with the custom callback, a TensorBoardLogger and a CSVLogger; returns what it printed."""
    parser = argparse.ArgumentParser(prog="aimz-trainer run custom_callback", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="TensorBoard directory (default: a new temporary one)")
    parser.add_argument("--num-rows", type=int, default=20_000)
    parser.add_argument("--num-features", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--devices", type=int, default=None, help="devices on the data axis (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    log_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="aimz-custom-callback-"))

    data, true_beta = make_data(args.num_rows, args.num_features, args.seed)
    model = make_model(args.num_rows, args.num_features)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    trainer = Trainer(
        max_epochs=args.max_epochs,
        rng_key=jax.random.key(args.seed),
        devices=args.devices,
        callbacks=[
            PosteriorMeanLogger(param="beta_auto_loc"),
            TensorBoardLogger(log_dir),
            CSVLogger(log_dir / "metrics.csv"),
        ],
    )
    result = trainer.fit(svi, data, batch_size=args.batch_size)

    fitted = np.asarray(result.params["beta_auto_loc"])
    print(f"custom_callback: {args.max_epochs} epochs, final loss {result.losses[-1]:,.1f}")
    print("beta posterior mean: " + ", ".join(f"{b:.3f}" for b in fitted))
    print("beta true:           " + ", ".join(f"{b:.3f}" for b in true_beta))
    print(f"TensorBoard logs in {log_dir}: tensorboard --logdir {log_dir} (the same curves in metrics.csv there)")
    return {"log_dir": str(log_dir), "beta_mean": fitted.tolist(), "beta_true": true_beta.tolist()}


if __name__ == "__main__":
    main()
