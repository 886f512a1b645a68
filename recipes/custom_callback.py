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

The recipe declares the callback as a default of its config's ``trainer.callbacks`` and asks
for a CSV log beside TensorBoard's (``loggers``). Run it with ``aimz-trainer fit --recipe
custom_callback [--output_dir runs/custom] [--trainer.max_epochs 20]``; the curves go to
``RUN_DIR/logs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import Callback, FitContext, FitProgress
from aimz_trainer.recipe import Experiment, FitOutcome, Recipe, RecipeContext, spec


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


@dataclass
class Settings:
    """The data.

    Args:
        num_rows: rows of simulated data.
        num_features: coefficients of the regression (columns of X).
        learning_rate: Adam's learning rate.
    """

    num_rows: int = 20_000
    num_features: int = 3
    learning_rate: float = 0.05


def setup(settings: Settings, context: RecipeContext) -> Experiment:
    """Simulated regression data (from the run's seed) and an AutoNormal SVI."""
    data, true_beta = make_data(settings.num_rows, settings.num_features, context.seed)
    model = make_model(settings.num_rows, settings.num_features)
    svi = SVI(model, AutoNormal(model), adam(settings.learning_rate), Trace_ELBO())
    return Experiment(svi=svi, train_data=data, extras={"true_beta": true_beta})


def report(settings: Settings, outcome: FitOutcome) -> dict[str, Any]:
    """Compare the fitted coefficients with the true ones; say where the curves went."""
    result, log_dir = outcome.result, outcome.context.output_dir / "logs"
    fitted = np.asarray(result.params["beta_auto_loc"])
    true_beta = outcome.experiment.extras["true_beta"]
    epochs = -(-result.losses.size // outcome.trainer.steps_per_epoch)
    print(f"custom_callback: {epochs} epochs, final loss {result.losses[-1]:,.1f}")
    print("beta posterior mean: " + ", ".join(f"{b:.3f}" for b in fitted))
    print("beta true:           " + ", ".join(f"{b:.3f}" for b in true_beta))
    print(f"TensorBoard logs in {log_dir}: tensorboard --logdir {log_dir} (the same curves in metrics.csv there)")
    return {"log_dir": str(log_dir), "beta_mean": fitted.tolist(), "beta_true": true_beta.tolist()}


# The callback is a config entry like any other: a run's config.yaml names it by its class_path
# (aimz_trainer.recipes.custom_callback.PosteriorMeanLogger), and --trainer.callbacks can change it.
RECIPE = Recipe(
    settings=Settings,
    setup=setup,
    trainer={"max_epochs": 20, "callbacks": [spec(PosteriorMeanLogger, param="beta_auto_loc")]},
    fit={"batch_size": 500},
    loggers=("tensorboard", "csv"),
    report=report,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``aimz-trainer fit --recipe custom_callback`` with the options ``argv``; returns the summary."""
    return RECIPE.main(argv)


if __name__ == "__main__":
    main()
